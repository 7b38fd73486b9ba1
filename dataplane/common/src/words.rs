//! Zeroing and copying the datapath's larger structs one aligned word at a time.
//!
//! In the eBPF object, a struct-wide assignment to memory that is not the program's stack (the
//! per-CPU packet slot, a conntrack map value) is emitted as a call to a `memset` or `memmove`
//! that moves one byte per loop turn: for the 88-byte conntrack entry, hundreds of instructions
//! on every packet, which more than doubled the established fast path when the packet and the
//! entry moved off the stack. Volatile word accesses cannot be merged back into such a call.

use core::mem::{align_of, size_of};

/// A machine word the helpers move: `u32` or `u64`.
pub trait Word: Copy + Default {}
impl Word for u32 {}
impl Word for u64 {}

/// Evaluated at compile time: `T` is made of whole, aligned `W` words.
struct Fits<T, W>(T, W);
impl<T, W> Fits<T, W> {
    const OK: () = assert!(
        size_of::<T>().is_multiple_of(size_of::<W>()) && align_of::<T>() >= align_of::<W>(),
        "the struct is not made of whole, aligned words"
    );
}

/// Zeroes `*dst` word by word.
#[inline(always)]
pub fn zero<T, W: Word>(dst: &mut T) {
    let () = Fits::<T, W>::OK;
    let p = dst as *mut T as *mut W;
    for i in 0..size_of::<T>() / size_of::<W>() {
        // SAFETY: `i` words lie inside `*dst`, which is aligned for `W` (checked above); all-zero
        // bytes are a valid value of every struct this is used on (plain integers).
        unsafe { p.add(i).write_volatile(W::default()) };
    }
}

/// Copies `*src` into `*dst` word by word.
#[inline(always)]
pub fn copy<T: Copy, W: Word>(dst: &mut T, src: &T) {
    let () = Fits::<T, W>::OK;
    let (d, s) = (dst as *mut T as *mut W, src as *const T as *const W);
    for i in 0..size_of::<T>() / size_of::<W>() {
        // SAFETY: as in `zero`; `T: Copy` so a bitwise copy is a valid value.
        unsafe { d.add(i).write_volatile(s.add(i).read_volatile()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    #[repr(C)]
    struct S {
        a: u64,
        b: [u32; 3],
        c: u16,
        d: [u8; 2],
    }

    #[test]
    fn zero_and_copy_cover_every_byte() {
        let full = S {
            a: u64::MAX,
            b: [1, 2, 3],
            c: 7,
            d: [8, 9],
        };
        let mut s = full;
        zero::<S, u64>(&mut s);
        assert_eq!(s, S::default());
        copy::<S, u64>(&mut s, &full);
        assert_eq!(s, full);
        zero::<S, u32>(&mut s);
        assert_eq!(s, S::default());
        copy::<S, u32>(&mut s, &full);
        assert_eq!(s, full);
    }
}
