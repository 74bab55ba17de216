//! A tiny eBPF assembler, for the programs aya cannot load (netfilter):
//! they are generated at run time, with map descriptors and per-namespace
//! constants written straight into the instructions.
use std::collections::HashMap;

use super::netfilter::Insn;

// Instruction classes, sizes, modes and operations (uapi/linux/bpf*.h).
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const K: u8 = 0x00;
const X: u8 = 0x08;

#[derive(Clone, Copy)]
pub enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    DW = 0x18,
}

#[derive(Clone, Copy)]
pub enum Alu {
    Add = 0x00,
    Or = 0x40,
    And = 0x50,
    Lsh = 0x60,
    Rsh = 0x70,
    Mov = 0xb0,
}

#[derive(Clone, Copy)]
pub enum Cond {
    Eq = 0x10,
    Ne = 0x50,
}

/// Helper function ids.
pub mod helper {
    pub const MAP_LOOKUP_ELEM: i32 = 1;
    pub const MAP_UPDATE_ELEM: i32 = 2;
    pub const MAP_DELETE_ELEM: i32 = 3;
    pub const KTIME_GET_NS: i32 = 5;
    pub const GET_SMP_PROCESSOR_ID: i32 = 8;
    pub const PROBE_READ_KERNEL: i32 = 113;
    pub const RINGBUF_OUTPUT: i32 = 130;
}

pub const R0: u8 = 0;
pub const R1: u8 = 1;
pub const R2: u8 = 2;
pub const R3: u8 = 3;
pub const R4: u8 = 4;
pub const R6: u8 = 6;
pub const R7: u8 = 7;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
pub const FP: u8 = 10;

/// Builds a program; jumps name labels that are resolved by [`Asm::finish`].
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

impl Asm {
    pub fn alu_imm(&mut self, op: Alu, dst: u8, imm: i32) -> &mut Self {
        self.insns.push(insn(ALU64 | op as u8 | K, dst, 0, 0, imm));
        self
    }

    pub fn alu_reg(&mut self, op: Alu, dst: u8, src: u8) -> &mut Self {
        self.insns.push(insn(ALU64 | op as u8 | X, dst, src, 0, 0));
        self
    }

    pub fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.alu_imm(Alu::Mov, dst, imm)
    }

    pub fn mov(&mut self, dst: u8, src: u8) -> &mut Self {
        self.alu_reg(Alu::Mov, dst, src)
    }

    /// dst = *(size *)(src + off)
    pub fn load(&mut self, size: Size, dst: u8, src: u8, off: i16) -> &mut Self {
        self.insns
            .push(insn(LDX | MEM | size as u8, dst, src, off, 0));
        self
    }

    /// *(size *)(dst + off) = src
    pub fn store(&mut self, size: Size, dst: u8, off: i16, src: u8) -> &mut Self {
        self.insns
            .push(insn(STX | MEM | size as u8, dst, src, off, 0));
        self
    }

    /// *(size *)(dst + off) = imm
    pub fn store_imm(&mut self, size: Size, dst: u8, off: i16, imm: i32) -> &mut Self {
        self.insns
            .push(insn(ST | MEM | size as u8, dst, 0, off, imm));
        self
    }

    /// lock *(u64 *)(dst + off) += src
    pub fn atomic_add(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.insns
            .push(insn(STX | ATOMIC | Size::DW as u8, dst, src, off, 0));
        self
    }

    /// dst = 64-bit immediate.
    pub fn ld_imm64(&mut self, dst: u8, imm: u64) -> &mut Self {
        self.insns.push(insn(0x18, dst, 0, 0, imm as u32 as i32));
        self.insns.push(insn(0, 0, 0, 0, (imm >> 32) as u32 as i32));
        self
    }

    /// dst = the map with this file descriptor.
    pub fn ld_map_fd(&mut self, dst: u8, fd: i32) -> &mut Self {
        const BPF_PSEUDO_MAP_FD: u8 = 1;
        self.insns.push(insn(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd));
        self.insns.push(insn(0, 0, 0, 0, 0));
        self
    }

    /// dst = fp + off
    pub fn stack_ptr(&mut self, dst: u8, off: i32) -> &mut Self {
        self.mov(dst, FP).alu_imm(Alu::Add, dst, off)
    }

    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.insns.push(insn(JMP | 0x80, 0, 0, 0, helper));
        self
    }

    pub fn jump_imm(&mut self, cond: Cond, reg: u8, imm: i32, to: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), to));
        self.insns.push(insn(JMP | cond as u8 | K, reg, 0, 0, imm));
        self
    }

    pub fn jump_reg(&mut self, cond: Cond, a: u8, b: u8, to: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), to));
        self.insns.push(insn(JMP | cond as u8 | X, a, b, 0, 0));
        self
    }

    pub fn goto(&mut self, to: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), to));
        self.insns.push(insn(JMP, 0, 0, 0, 0));
        self
    }

    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.insns.len());
        self
    }

    pub fn exit(&mut self) -> &mut Self {
        self.insns.push(insn(JMP | 0x90, 0, 0, 0, 0));
        self
    }

    /// Resolves jumps; panics on an unknown label (a bug in the generator).
    pub fn finish(mut self) -> Vec<Insn> {
        for (at, label) in std::mem::take(&mut self.fixups) {
            let target = self.labels[label];
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_resolve_forward_and_backward() {
        let mut a = Asm::default();
        a.label("top")
            .jump_imm(Cond::Eq, R1, 0, "end")
            .mov_imm(R0, 0)
            .goto("top")
            .label("end")
            .mov_imm(R0, 1)
            .exit();
        let p = a.finish();
        assert_eq!(p[0].off, 2, "skips two instructions to `end`");
        assert_eq!(p[2].off, -3, "back to `top`");
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn wide_immediates_take_two_slots() {
        let mut a = Asm::default();
        a.ld_imm64(R1, 0x1122_3344_5566_7788);
        let p = a.finish();
        assert_eq!(p[0].imm as u32, 0x5566_7788);
        assert_eq!(p[1].imm as u32, 0x1122_3344);
    }
}
