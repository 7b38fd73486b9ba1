//! Window fields that only move forward, updated with compare-and-swap.
//!
//! The kernel moves a connection's window data under the connection's lock. The eBPF programs
//! have no lock: two CPUs can handle segments of one connection at the same instant (a sender
//! whose segments leave from process context on one CPU and from the softirq that took an ACK on
//! another), and with plain stores the one that read first can write last, moving `td_end` back
//! below data already sent. The receiver's acknowledgment of that data then looked like an
//! acknowledgment of data never sent and was refused as INVALID (1 to 9 ACKs in 8 s of a
//! full-speed iperf3 stream between two pods of a 2-core machine). A compare-and-swap that only
//! stores a value ahead of the one it finds cannot move a field back: whichever CPU writes last,
//! the field ends at the furthest value any of them saw.
//!
//! On the BPF target this is the 32-bit `BPF_ATOMIC | BPF_CMPXCHG` instruction (kernel 5.12),
//! written out as its encoding (see [`compare_and_swap`]); in userspace (unit tests, the agent's
//! migration of a table) the same loop over `AtomicU32`.

use crate::window::seq_after;

/// How many times a store is tried while other CPUs move the field. Each failed try means another
/// CPU stored meanwhile; a store that still loses after the last try leaves the field with the
/// other CPUs' value (never behind the one first read), which only a sender on eight CPUs at
/// once could make happen.
const TRIES: usize = 8;

/// One compare-and-swap of `*field` from `old` to `new`: the value found there (`old` when the
/// store happened).
///
/// # Safety
///
/// `field` is valid and aligned, and concurrent writers use this function or aligned stores.
#[inline(always)]
unsafe fn compare_and_swap(field: *mut u32, old: u32, new: u32) -> u32 {
    #[cfg(target_arch = "bpf")]
    {
        let found: u64;
        // `w0 = cmpxchg32_32(r1 + 0, w0, w2)`, written out as its encoding: opcode 0xc3
        // (BPF_STX | BPF_ATOMIC | BPF_W), registers 0x21 (source r2, destination r1), offset 0,
        // immediate 0xf1 (BPF_CMPXCHG). The kernel has run it since 5.12 whatever the program
        // was compiled for, but LLVM emits (and assembles) it only with ALU32, which for the
        // whole program made the parser and the established path a third slower (measured
        // with scripts/bench-compare.sh); LLVM's BPF backend takes no per-function features.
        // SAFETY: as the caller promises; r0 (the value expected, then the one found, zero
        // extended), r1 and r2 are declared to the compiler, nothing else is touched.
        unsafe {
            core::arch::asm!(
                ".8byte 0x000000f1000021c3",
                inout("r0") u64::from(old) => found,
                in("r1") field,
                in("r2") u64::from(new),
                options(nostack),
            );
        }
        found as u32
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU32, Ordering::Relaxed};
        // SAFETY: as the caller promises; an aligned `u32` is a valid `AtomicU32`.
        let atomic = unsafe { AtomicU32::from_ptr(field) };
        match atomic.compare_exchange(old, new, Relaxed, Relaxed) {
            Ok(found) | Err(found) => found,
        }
    }
}

/// Stores `new` in `*field` when `ahead(new, current)` holds, never moving it back across a
/// concurrent store; whether this call's store happened.
///
/// # Safety
///
/// As [`compare_and_swap`].
#[inline(always)]
unsafe fn store_if_ahead(field: *mut u32, new: u32, ahead: impl Fn(u32, u32) -> bool) -> bool {
    // SAFETY: as the caller promises; volatile so that the read is not merged with an earlier
    // plain one (another CPU may have stored since).
    let mut current = unsafe { core::ptr::read_volatile(field) };
    for _ in 0..TRIES {
        if !ahead(new, current) {
            return false;
        }
        // SAFETY: as the caller promises.
        let found = unsafe { compare_and_swap(field, current, new) };
        if found == current {
            return true;
        }
        current = found;
    }
    false
}

/// Moves the sequence number in `*field` forward to `new` (`after()` in the 2^32 circle), unless
/// it is already there or beyond; whether it moved.
#[inline(always)]
pub fn advance_seq(field: &mut u32, new: u32) -> bool {
    // SAFETY: from a reference.
    unsafe { store_if_ahead(field, new, seq_after) }
}

/// Raises `*field` to `new` when `new` is larger (a window size, not a sequence number).
#[inline(always)]
pub fn raise(field: &mut u32, new: u32) {
    // SAFETY: from a reference.
    unsafe { store_if_ahead(field, new, |a, b| a > b) };
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

    #[test]
    fn a_sequence_number_moves_forward_across_the_wrap_and_never_back() {
        let mut f = u32::MAX - 10;
        assert!(advance_seq(&mut f, 5), "across 2^32 is forward");
        assert_eq!(f, 5);
        assert!(!advance_seq(&mut f, u32::MAX - 3), "before 5 in the circle");
        assert!(!advance_seq(&mut f, 5), "the same value is not a move");
        assert_eq!(f, 5);
    }

    #[test]
    fn a_window_is_only_raised() {
        let mut f = 1000;
        raise(&mut f, 999);
        assert_eq!(f, 1000);
        raise(&mut f, 70_000);
        assert_eq!(f, 70_000);
    }

    /// Four threads each advancing one field through their own increasing values while a fifth
    /// watches it: it never moves back (with plain stores it does, whenever a thread that read
    /// first writes last), and it ends at one of the last values (the last thread to finish
    /// stores without contention).
    #[test]
    fn concurrent_advances_never_move_the_field_back() {
        const STEPS: u32 = 2_000_000;
        let field = AtomicU32::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let (mut last, mut backwards) = (0, 0u32);
                while !done.load(Relaxed) {
                    let now = field.load(Relaxed);
                    if now < last {
                        backwards += 1;
                    }
                    last = now;
                }
                backwards
            });
            let writers: std::vec::Vec<_> = (0..4u32)
                .map(|t| {
                    let field = &field;
                    s.spawn(move || {
                        for i in 1..=STEPS {
                            // SAFETY: an atomic's own memory, only ever accessed atomically.
                            unsafe { store_if_ahead(field.as_ptr(), i * 4 + t, seq_after) };
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().expect("a writer");
            }
            done.store(true, Relaxed);
            assert_eq!(watcher.join().expect("the watcher"), 0, "moves back seen");
        });
        assert!(field.into_inner() >= STEPS * 4, "ends at a last value");
    }
}
