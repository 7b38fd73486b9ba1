//! The datapath's packet parser on any bytes: parsing the skb's linear part in place first
//! (`parse_head_first`, where the linear part may end anywhere) must give exactly what parsing the
//! whole frame through the helper gives (`parse`), error included; a frame read in place whole
//! needs no helper read; and the ICMP error and TCP option parsers that run on the parsed packet
//! never panic.
//!
//! Input: two control bytes, then the frame. Bit 0 of the first says whether the skb is a GSO
//! super-packet (both frames say the same, as both read the same skb); the rest of the two bytes
//! chooses where the linear part ends (modulo the frame's length plus one).

#![no_main]

use std::cell::Cell;

use kubesg_common::parse::{
    has_tcp_options_to_walk, parse, parse_head_first, parse_icmp_error_inner, parse_tcp_options,
    Frame, Malformed,
};
use libfuzzer_sys::fuzz_target;

/// The skb's linear part, as the datapath's `LinearFrame` sees it: its length is the whole
/// packet's, reads past `readable` are `None`.
struct Head<'a> {
    frame: &'a [u8],
    readable: usize,
    gso: bool,
}

impl Frame for Head<'_> {
    fn len(&self) -> usize {
        self.frame.len()
    }

    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.frame[..self.readable].read(off)
    }

    fn is_gso(&self) -> bool {
        self.gso
    }
}

/// The whole skb read through the helper (`SkbFrame`), counting the reads made through it.
struct Whole<'a> {
    frame: &'a [u8],
    gso: bool,
    reads: Cell<usize>,
}

impl Frame for Whole<'_> {
    fn len(&self) -> usize {
        self.frame.len()
    }

    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.reads.set(self.reads.get() + 1);
        self.frame.read(off)
    }

    fn is_gso(&self) -> bool {
        self.gso
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((control, frame)) = data.split_first_chunk::<2>() else {
        return;
    };
    let control = u16::from_le_bytes(*control);
    let gso = control & 1 != 0;
    let readable = usize::from(control >> 1) % (frame.len() + 1);

    let reference = Whole {
        frame,
        gso,
        reads: Cell::new(0),
    };
    let expected = parse(&reference);

    let head = Head {
        frame,
        readable,
        gso,
    };
    let whole = Whole {
        frame,
        gso,
        reads: Cell::new(0),
    };
    let got = parse_head_first(&head, &whole);
    assert_eq!(
        got,
        expected,
        "{readable} of {} bytes readable in place (gso {gso})",
        frame.len()
    );
    if readable == frame.len() && expected != Err(Malformed::Truncated) {
        assert_eq!(
            whole.reads.get(),
            0,
            "a frame whose linear part is all of it is read in place only"
        );
    }

    // What the datapath does next with a parsed packet: the quoted header of an ICMP error
    // (through the helper, as the datapath reads it) and the TCP options.
    if let Ok(Some(mut pkt)) = expected {
        if let Some(inner) = parse_icmp_error_inner(&reference, &pkt) {
            assert_eq!(
                inner.family, pkt.family,
                "the quoted packet is of the outer's family"
            );
        }
        if has_tcp_options_to_walk(&pkt) {
            parse_tcp_options(&reference, &mut pkt);
            assert!(pkt.tcp.wscale <= kubesg_common::parse::TCP_MAX_WSCALE);
        }
    }
});
