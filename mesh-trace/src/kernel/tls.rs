//! Where the traced processes' TLS code lives, for the plaintext probes
//! (`mesh-trace-ebpf/src/probes/tls.rs`): the OpenSSL-compatible libraries
//! they map (`libssl.so*`: OpenSSL, and BoringSSL built as a shared
//! library) and their executable, for a TLS library linked in statically
//! (Envoy's BoringSSL) when its symbols are there.
//!
//! A uprobe is set on a file, not a process: every process that maps the
//! file pays a trap per `SSL_write`/`SSL_read`, traced or not. So only the
//! files of processes that did I/O on a meshed socket are probed, each once
//! (by device and inode, whatever path or mount namespace it is seen
//! through).
use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The functions probed: entry programs by symbol; every one also gets the
/// return program.
pub const SYMBOLS: [(&str, &str); 4] = [
    ("SSL_write", mesh_trace_common::names::SSL_WRITE),
    ("SSL_write_ex", mesh_trace_common::names::SSL_WRITE_EX),
    ("SSL_read", mesh_trace_common::names::SSL_READ),
    ("SSL_read_ex", mesh_trace_common::names::SSL_READ_EX),
];

/// Files looked at (probed or not), and processes remembered as looked at.
/// Files are never forgotten: a file probed twice would report each call
/// twice. Past the bound, new files are not probed (said once); the
/// processes start over.
const MAX_FILES: usize = 4096;

/// A file a process maps, as the agent can open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFile {
    /// Device and inode: one file whatever it is called.
    pub key: (u64, u64),
    /// A path the agent can open: through the process's root, so a
    /// container's own library is found.
    pub path: PathBuf,
    /// The path as the process sees it, for logs.
    pub shown: String,
    /// A mapped library (else the executable).
    pub library: bool,
}

/// The files of a process that may hold TLS code: mapped `libssl` and the
/// executable. Empty when the process is gone; an error when its maps may
/// not be read (a security module or ptrace rules denying this agent).
pub fn files_of(pid: u32) -> std::io::Result<Vec<TlsFile>> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let mut out = Vec::new();
    let maps = match fs::read_to_string(proc.join("maps")) {
        Ok(maps) => Some(maps),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(e),
        // Gone.
        Err(_) => None,
    };
    if let Some(maps) = maps {
        for (key, path) in ssl_libraries(&maps) {
            if out.iter().any(|f: &TlsFile| f.key == key) {
                continue;
            }
            out.push(TlsFile {
                key,
                path: proc.join("root").join(path.trim_start_matches('/')),
                shown: path.to_string(),
                library: true,
            });
        }
    }
    if !out.is_empty() {
        // Its TLS is in the library.
        return Ok(out);
    }
    let exe = proc.join("exe");
    if let (Ok(meta), Ok(shown)) = (fs::metadata(&exe), fs::read_link(&exe)) {
        let key = (meta.dev(), meta.ino());
        if !out.iter().any(|f| f.key == key) {
            out.push(TlsFile {
                key,
                path: exe,
                shown: shown.display().to_string(),
                library: false,
            });
        }
    }
    Ok(out)
}

/// Mapped files named `libssl*.so*` in a `/proc/PID/maps` text, with
/// their device and inode.
fn ssl_libraries(maps: &str) -> Vec<((u64, u64), &str)> {
    let mut out = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(_), Some(_), Some(_), Some(dev), Some(inode), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        if !(name.starts_with("libssl") && name.contains(".so")) {
            continue;
        }
        let (Some(dev), Ok(inode)) = (parse_dev(dev), inode.parse::<u64>()) else {
            continue;
        };
        if inode != 0 && !out.iter().any(|(k, _)| *k == (dev, inode)) {
            out.push(((dev, inode), path));
        }
    }
    out
}

/// `major:minor` in hex, as `stat`'s `st_dev` encodes it (glibc's
/// `makedev`).
fn parse_dev(s: &str) -> Option<u64> {
    let (major, minor) = s.split_once(':')?;
    let major = u64::from_str_radix(major, 16).ok()?;
    let minor = u64::from_str_radix(minor, 16).ok()?;
    Some(
        ((major & 0xffff_f000) << 32)
            | ((major & 0xfff) << 8)
            | ((minor & 0xffff_ff00) << 12)
            | (minor & 0xff),
    )
}

/// Whether `path` defines any probed function: an ELF file read through a
/// cache (its headers and symbol tables only, not a large executable's
/// code).
pub fn defines_tls_functions(path: &Path) -> bool {
    use object::{Object as _, ObjectSymbol as _};
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let cache = object::ReadCache::new(file);
    let Ok(obj) = object::File::parse(&cache) else {
        return false;
    };
    obj.dynamic_symbols()
        .chain(obj.symbols())
        .any(|s| s.is_definition() && s.name().is_ok_and(|n| SYMBOLS.iter().any(|(f, _)| *f == n)))
}

/// The processes whose network namespace is one of the namespaces in
/// `netns_dir` (the pods'), at most `max`: their TLS libraries are probed
/// when the agent starts, before they open the connections it will see
/// (HTTP/2 inside TLS is decoded only from a session's first bytes).
pub fn pids_in_namespaces(netns_dir: &Path, max: usize) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(netns_dir) else {
        return Vec::new();
    };
    let pods: HashSet<(u64, u64)> = entries
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if pods.is_empty() {
        return Vec::new();
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| pods.contains(&(m.dev(), m.ino())))
        })
        .take(max)
        .collect()
}

/// The files of `pids` not looked at before that define TLS functions.
/// Libraries first: when any is found it is returned at once, and the
/// executables (a large one takes a second to read) wait for the next
/// call, so that a sidecar's libssl is probed without that delay.
pub fn scan(seen: &mut Seen, pids: &[u32]) -> Vec<TlsFile> {
    let mut libraries = Vec::new();
    for &pid in pids {
        let files = match files_of(pid) {
            Ok(files) => files,
            Err(e) => {
                seen.denied += 1;
                if seen.denied == 1 {
                    tracing::warn!(
                        "TLS plaintext probes: cannot read /proc/{pid}/maps ({e}): the TLS \
                         library of a process this agent may not inspect is not probed"
                    );
                }
                continue;
            }
        };
        for file in files {
            if !seen.new_file(&file) {
                continue;
            }
            if !file.library {
                seen.executables.push(file);
            } else if defines_tls_functions(&file.path) {
                libraries.push(file);
            }
        }
    }
    if !libraries.is_empty() {
        return libraries;
    }
    std::mem::take(&mut seen.executables)
        .into_iter()
        .filter(|f| defines_tls_functions(&f.path))
        .collect()
}

/// Files already probed or tried, so each is handled once.
#[derive(Default)]
pub struct Seen {
    files: HashSet<(u64, u64)>,
    pids: HashSet<u32>,
    /// Executables still to look at.
    executables: Vec<TlsFile>,
    /// Processes whose maps could not be read.
    pub denied: u64,
    /// No room is left for new files (said once).
    full: bool,
}

impl Seen {
    /// Whether `pid` is new (its files not looked at yet).
    pub fn new_process(&mut self, pid: u32) -> bool {
        if self.pids.len() >= MAX_FILES {
            self.pids.clear();
        }
        self.pids.insert(pid)
    }

    /// Whether executables wait to be looked at.
    pub fn pending(&self) -> bool {
        !self.executables.is_empty()
    }

    /// Whether `file` is new (and there is room to remember it).
    pub fn new_file(&mut self, file: &TlsFile) -> bool {
        if self.files.contains(&file.key) {
            return false;
        }
        if self.files.len() >= MAX_FILES {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    "TLS plaintext probes: {MAX_FILES} files looked at; {} and later ones are \
                     not probed",
                    file.shown
                );
            }
            return false;
        }
        self.files.insert(file.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mapped_libssl_once_with_its_device_and_inode() {
        let maps = "\
7f1c2a000000-7f1c2a01f000 r--p 00000000 fd:01 393460 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2a01f000-7f1c2a07f000 r-xp 0001f000 fd:01 393460 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2b000000-7f1c2b001000 r-xp 00000000 fd:01 393999 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1c2c000000-7f1c2c001000 rw-p 00000000 00:00 0 
7ffd1000000-7ffd1021000 rw-p 00000000 00:00 0 [stack]
";
        let libs = ssl_libraries(maps);
        assert_eq!(libs.len(), 1, "{libs:?}");
        assert_eq!(libs[0].1, "/usr/lib/x86_64-linux-gnu/libssl.so.3");
        assert_eq!(libs[0].0, (parse_dev("fd:01").unwrap(), 393460));
    }

    #[test]
    fn devices_are_encoded_as_stat_reports_them() {
        // makedev(253, 1) and makedev(8, 17) as glibc encodes them.
        assert_eq!(parse_dev("fd:01"), Some(0xfd01));
        assert_eq!(parse_dev("08:11"), Some(0x811));
        assert_eq!(parse_dev("103:02"), Some((0x103 & 0xfff) << 8 | 2));
        assert_eq!(parse_dev("zz"), None);
    }

    #[test]
    fn the_system_libssl_defines_the_probed_functions_and_this_binary_does_not() {
        let libssl = format!("/usr/lib/{}-linux-gnu/libssl.so.3", std::env::consts::ARCH);
        let libssl = Path::new(&libssl);
        assert!(libssl.exists(), "libssl3 is a prerequisite of the tests");
        assert!(defines_tls_functions(libssl));
        assert!(!defines_tls_functions(Path::new("/proc/self/exe")));
    }

    #[test]
    fn a_process_lists_its_libssl_or_else_its_executable() {
        let files = files_of(std::process::id()).unwrap();
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        if maps.contains("libssl") {
            // The lab links OpenSSL: its TLS is there, not in the executable.
            assert!(files.iter().all(|f| f.library), "{files:?}");
            assert!(
                files.iter().any(|f| f.shown.contains("libssl")),
                "{files:?}"
            );
        } else {
            assert_eq!(files.len(), 1, "{files:?}");
            assert!(files[0].path.ends_with("exe") && !files[0].library);
        }
    }
}
