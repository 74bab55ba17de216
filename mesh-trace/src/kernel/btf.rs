//! Just enough of a BTF reader to find struct member offsets in the running
//! kernel (/sys/kernel/btf/vmlinux), for programs that read kernel structs
//! without CO-RE. aya keeps its own BTF lookups private.
use anyhow::{bail, Context as _};

const MAGIC: u16 = 0xeb9f;

// BTF kinds whose trailing data we must skip or read.
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// Structs and unions one member lookup looks into (anonymous ones inside
/// anonymous ones): far more than any kernel struct holds.
const MAX_SEARCHED: usize = 1024;

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// size, or the referenced type id.
    size_or_type: u32,
    /// (name_off, type, bit offset) for structs and unions.
    members: Vec<(u32, u32, u32)>,
    /// Entries of a struct, union, enum or function prototype.
    vlen: usize,
    /// (name_off, value) for enums.
    enumerators: Vec<(u32, u32)>,
}

pub struct KernelBtf {
    /// Index = type id; id 0 is void.
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> anyhow::Result<u32> {
    let s = b.get(off..off + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

impl KernelBtf {
    pub fn from_sys_fs() -> anyhow::Result<KernelBtf> {
        let data = std::fs::read(super::sysfs::VMLINUX_BTF)
            .with_context(|| format!("reading {}", super::sysfs::VMLINUX_BTF))?;
        Self::parse(&data)
    }

    pub fn parse(b: &[u8]) -> anyhow::Result<KernelBtf> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != MAGIC {
            bail!("not little-endian BTF");
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_start = hdr_len + type_off;
        let strings_start = hdr_len + str_off;
        let strings = b
            .get(strings_start..strings_start + str_len)
            .context("BTF string section truncated")?
            .to_vec();
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: Vec::new(),
            vlen: 0,
            enumerators: Vec::new(),
        }];
        let mut off = types_start;
        while off < types_start + type_len {
            let name_off = u32_at(b, off)?;
            let info = u32_at(b, off + 4)?;
            let size_or_type = u32_at(b, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let mut members = Vec::new();
            let mut enumerators = Vec::new();
            if kind == ENUM {
                for i in 0..vlen {
                    let e = off + i * 8;
                    enumerators.push((u32_at(b, e)?, u32_at(b, e + 4)?));
                }
            }
            // An array's element type is kept where other kinds keep theirs.
            let size_or_type = if kind == ARRAY {
                u32_at(b, off)?
            } else {
                size_or_type
            };
            off += match kind {
                INT | VAR | DECL_TAG => 4,
                ARRAY => 12,
                STRUCT | UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        members.push((u32_at(b, m)?, u32_at(b, m + 4)?, u32_at(b, m + 8)?));
                    }
                    12 * vlen
                }
                ENUM | FUNC_PROTO => 8 * vlen,
                DATASEC | ENUM64 => 12 * vlen,
                _ => 0,
            };
            types.push(Type {
                name_off,
                kind,
                kind_flag: info >> 31 == 1,
                size_or_type,
                members,
                vlen,
                enumerators,
            });
        }
        Ok(KernelBtf { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let s = &self.strings[(off as usize).min(self.strings.len())..];
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG) => {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `member` in `struct name`, looking inside anonymous
    /// structs and unions as C does.
    pub fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32> {
        let id = self
            .types
            .iter()
            .position(|t| t.kind == STRUCT && self.name(t.name_off) == name)
            .with_context(|| format!("struct {name} not in kernel BTF"))?;
        self.find_member(id as u32, member)
            .map(|(bits, _)| bits / 8)
            .with_context(|| format!("struct {name} has no member {member}"))
    }

    /// Byte offset of a member reached from `struct name` through a path of
    /// members (e.g. `nf_conn`, `tuplehash.tuple.dst.u3`), stepping into
    /// arrays at their first element.
    pub fn member_path_offset(&self, name: &str, path: &str) -> anyhow::Result<u32> {
        let mut id =
            self.types
                .iter()
                .position(|t| t.kind == STRUCT && self.name(t.name_off) == name)
                .with_context(|| format!("struct {name} not in kernel BTF"))? as u32;
        let mut bits = 0;
        for member in path.split('.') {
            let (at, ty) = self
                .find_member(id, member)
                .with_context(|| format!("struct {name} has no member {path}"))?;
            bits = at
                .checked_add(bits)
                .with_context(|| format!("struct {name}'s {path} is beyond 4 GiB"))?;
            id = self.resolve(ty);
            // Arrays of arrays, to a bound: an array of itself (only a
            // broken BTF) would hold this loop forever.
            for _ in 0..32 {
                match self.types.get(id as usize) {
                    Some(t) if t.kind == ARRAY => id = self.resolve(t.size_or_type),
                    _ => break,
                }
            }
        }
        Ok(bits / 8)
    }

    /// Arguments a BTF-enabled tracepoint passes (its `btf_trace_<name>`
    /// prototype less the leading context pointer).
    pub fn tracepoint_args(&self, tracepoint: &str) -> anyhow::Result<usize> {
        let typedef = format!("btf_trace_{tracepoint}");
        let t = self
            .types
            .iter()
            .find(|t| t.kind == TYPEDEF && self.name(t.name_off) == typedef)
            .with_context(|| format!("tracepoint {tracepoint} not in kernel BTF"))?;
        let ptr = self.types.get(t.size_or_type as usize);
        let proto = ptr
            .filter(|p| p.kind == PTR)
            .and_then(|p| self.types.get(p.size_or_type as usize))
            .filter(|f| f.kind == FUNC_PROTO)
            .with_context(|| format!("{typedef} is not a function pointer"))?;
        Ok(proto.vlen.saturating_sub(1))
    }

    /// The names of `enum name`'s values, by value.
    pub fn enum_values(&self, name: &str) -> anyhow::Result<Vec<(u32, String)>> {
        let t = self
            .types
            .iter()
            .find(|t| t.kind == ENUM && self.name(t.name_off) == name)
            .with_context(|| format!("enum {name} not in kernel BTF"))?;
        Ok(t.enumerators
            .iter()
            .map(|&(n, v)| (v, self.name(n).to_string()))
            .collect())
    }

    /// (bit offset, type id) of `member` in the struct or union `id`.
    fn find_member(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        self.find_member_in(id, member, &mut std::collections::HashSet::new())
    }

    /// [`Self::find_member`], looking into each type once and into at most
    /// [`MAX_SEARCHED`]: a broken BTF's struct that holds itself, or
    /// anonymous members that share types, would otherwise recurse forever
    /// or take exponential time.
    fn find_member_in(
        &self,
        id: u32,
        member: &str,
        searched: &mut std::collections::HashSet<u32>,
    ) -> Option<(u32, u32)> {
        if searched.len() >= MAX_SEARCHED || !searched.insert(id) {
            return None;
        }
        let t = self.types.get(id as usize)?;
        for &(name_off, ty, offset) in &t.members {
            let bits = if t.kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            if name_off == 0 {
                let inner = self.resolve(ty);
                if let Some((o, ty)) = self.find_member_in(inner, member, searched) {
                    return Some((bits.checked_add(o)?, ty));
                }
            } else if self.name(name_off) == member {
                return Some((bits, ty));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: struct s { int a; union { int b; int c; }; }.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0".to_vec();
        let mut types = Vec::new();
        let mut push = |v: &[u32]| {
            v.iter()
                .for_each(|x| types.extend_from_slice(&x.to_le_bytes()))
        };
        // 1: int (4 bytes)
        push(&[1, INT << 24, 4, 32]);
        // 2: anonymous union { b; c; }
        push(&[0, (UNION << 24) | 2, 4, 9, 1, 0, 11, 1, 0]);
        // 3: struct s { a @0; <anon> @32 bits }
        push(&[5, (STRUCT << 24) | 2, 8, 7, 1, 0, 0, 2, 32]);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&types);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = KernelBtf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("s", "a").unwrap(), 0);
        assert_eq!(btf.member_offset("s", "c").unwrap(), 4);
        assert!(btf.member_offset("s", "d").is_err());
        assert!(btf.member_offset("t", "a").is_err());
    }

    /// A path through nested structs and an array adds up the members'
    /// own offsets: conntrack's original destination, as the NAT program
    /// reads it.
    #[test]
    fn follows_member_paths_through_arrays_in_the_running_kernel() {
        let btf = KernelBtf::from_sys_fs().unwrap();
        let path = |p| btf.member_path_offset("nf_conn", p).unwrap();
        let sum = btf.member_offset("nf_conn", "tuplehash").unwrap()
            + btf
                .member_offset("nf_conntrack_tuple_hash", "tuple")
                .unwrap()
            + btf.member_offset("nf_conntrack_tuple", "dst").unwrap();
        assert_eq!(path("tuplehash.tuple.dst"), sum);
        assert_eq!(path("tuplehash.tuple.dst.u3"), sum);
        // union nf_inet_addr is 16 bytes; the port union follows it.
        assert_eq!(path("tuplehash.tuple.dst.u"), sum + 16);
        assert!(btf.member_path_offset("nf_conn", "tuplehash.nope").is_err());
    }

    /// The running kernel (6.14 or later here) passes the retransmission's
    /// result and the reset's reason, and names the reasons.
    #[test]
    fn reads_tracepoint_prototypes_and_enums_of_the_running_kernel() {
        let btf = KernelBtf::from_sys_fs().unwrap();
        assert_eq!(btf.tracepoint_args("tcp_retransmit_skb").unwrap(), 3);
        assert_eq!(btf.tracepoint_args("tcp_send_reset").unwrap(), 3);
        assert_eq!(btf.tracepoint_args("tcp_receive_reset").unwrap(), 1);
        assert!(btf.tracepoint_args("no_such_tracepoint").is_err());
        let reasons = btf.enum_values("sk_rst_reason").unwrap();
        assert!(
            reasons
                .iter()
                .any(|(v, n)| *v == 0 && n == "SK_RST_REASON_NOT_SPECIFIED"),
            "{reasons:?}"
        );
    }
}
