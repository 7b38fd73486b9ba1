//! TCP window tracking through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): what
//! nf_conntrack's `tcp_in_window` refuses (blind resets and FINs, data beyond the window) is
//! INVALID and leaves the connection as it was; the TCP options the programs read (Window Scale,
//! SACK Permitted) change what the window admits.

use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::{
    conntrack::TcpState,
    event::DenyReason,
    window::{SIDE_SACK_PERM, SIDE_WINDOW_SCALE},
};
use kubesg_testkit::{
    family::{Family, POD_PORT},
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP},
    packet::{self, isn, TcpSegment},
    rules::{egress, port, rule},
};

/// May open TCP connections to port 80; accepts nothing.
fn client() -> CompiledPolicy {
    egress(vec![rule(Protocol::Tcp, vec![port(80)])])
}

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// Window Scale option with `shift`, then SACK Permitted.
fn wscale_and_sack_perm(shift: u8) -> Vec<u8> {
    vec![3, 3, shift, 4, 2, 1]
}

/// A segment of the pod's connection to peer:80, from the pod.
fn from_pod(f: Family, seg: TcpSegment) -> Vec<u8> {
    packet::tcp_segment(f.pod, f.peer, POD_PORT, 80, seg)
}

/// A segment of the pod's connection to peer:80, from the peer.
fn from_peer(f: Family, seg: TcpSegment) -> Vec<u8> {
    packet::tcp_segment(f.peer, f.pod, 80, POD_PORT, seg)
}

/// The pod's first sequence number after its SYN, and the peer's.
fn next_seq() -> (u32, u32) {
    (isn(POD_PORT).wrapping_add(1), isn(80).wrapping_add(1))
}

/// A handshake in which the pod offers `pod_opts` and the peer `peer_opts` on their SYNs.
fn handshake_with(dp: &LoopbackDatapath, f: Family, pod_opts: Vec<u8>, peer_opts: Vec<u8>) {
    let (pod, peer) = next_seq();
    let syn = TcpSegment {
        bits: SYN,
        seq: isn(POD_PORT),
        options: pod_opts,
        ..TcpSegment::default()
    };
    assert_eq!(dp.pod_sends(&from_pod(f, syn)), ACCEPT, "SYN");
    let syn_ack = TcpSegment {
        bits: SYN | ACK,
        seq: isn(80),
        ack: pod,
        options: peer_opts,
        ..TcpSegment::default()
    };
    assert_eq!(dp.pod_receives(&from_peer(f, syn_ack)), ACCEPT, "SYN/ACK");
    let ack = TcpSegment {
        bits: ACK,
        seq: pod,
        ack: peer,
        ..TcpSegment::default()
    };
    assert_eq!(dp.pod_sends(&from_pod(f, ack)), ACCEPT, "ACK");
    assert_eq!(state(dp), TcpState::Established);
}

fn handshake(dp: &LoopbackDatapath, f: Family) {
    handshake_with(dp, f, vec![], vec![]);
}

fn state(dp: &LoopbackDatapath) -> TcpState {
    dp.conn().tcp_state().expect("a TCP entry")
}

/// A segment from the peer with `bits` at `peer_seq`, acknowledging all the pod sent.
fn peer_segment(bits: u8, seq: u32) -> TcpSegment {
    TcpSegment {
        bits,
        seq,
        ack: next_seq().0,
        ..TcpSegment::default()
    }
}

ipv4_and_ipv6! {
    blind_rst_out_of_the_window_is_dropped_and_the_connection_stays,
    rst_at_the_acknowledged_sequence_number_closes_the_connection,
    rst_in_the_window_but_not_exact_passes_and_changes_nothing,
    blind_fin_beyond_the_window_is_dropped_and_the_connection_stays,
    data_beyond_the_window_is_dropped,
    acknowledging_data_never_sent_is_dropped,
    window_scale_options_are_read_and_widen_the_window,
    window_scale_offered_by_one_side_only_is_not_used,
    sack_blocks_count_when_sack_was_permitted,
}

fn blind_rst_out_of_the_window_is_dropped_and_the_connection_stays(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let (_, peer) = next_seq();
    let blind = peer.wrapping_add(1 << 30);
    assert_eq!(
        dp.pod_receives(&from_peer(f, peer_segment(RST, blind))),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(state(&dp), TcpState::Established);
    // The connection still carries data both ways.
    assert_eq!(
        dp.pod_receives(&from_peer(f, peer_segment(PSH | ACK, peer))),
        ACCEPT
    );
}

fn rst_at_the_acknowledged_sequence_number_closes_the_connection(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let (_, peer) = next_seq();
    assert_eq!(
        dp.pod_receives(&from_peer(f, peer_segment(RST, peer))),
        ACCEPT
    );
    assert_eq!(state(&dp), TcpState::Close);
}

fn rst_in_the_window_but_not_exact_passes_and_changes_nothing(f: Family) {
    // As nf_conntrack (RFC 5961): the pod answers it with a challenge ACK, and only an RST at
    // the exact number closes the connection.
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let (_, peer) = next_seq();
    assert_eq!(
        dp.pod_receives(&from_peer(f, peer_segment(RST, peer.wrapping_add(1000)))),
        ACCEPT
    );
    assert_eq!(state(&dp), TcpState::Established);
}

fn blind_fin_beyond_the_window_is_dropped_and_the_connection_stays(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let (_, peer) = next_seq();
    assert_eq!(
        dp.pod_receives(&from_peer(
            f,
            peer_segment(FIN | ACK, peer.wrapping_add(1 << 30))
        )),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(state(&dp), TcpState::Established);
    // The real FIN still closes.
    assert_eq!(
        dp.pod_receives(&from_peer(f, peer_segment(FIN | ACK, peer))),
        ACCEPT
    );
    assert_eq!(state(&dp), TcpState::FinWait);
}

fn data_beyond_the_window_is_dropped(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let (_, peer) = next_seq();
    // The pod advertised 64 240 bytes unscaled: data starting 1 MB ahead cannot be in it.
    let far = TcpSegment {
        payload: vec![0; 100],
        ..peer_segment(PSH | ACK, peer.wrapping_add(1 << 20))
    };
    assert_eq!(dp.pod_receives(&from_peer(f, far)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    let near = TcpSegment {
        payload: vec![0; 100],
        ..peer_segment(PSH | ACK, peer)
    };
    assert_eq!(dp.pod_receives(&from_peer(f, near)), ACCEPT);
}

fn acknowledging_data_never_sent_is_dropped(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let (pod, peer) = next_seq();
    // The pod sent nothing after its SYN: an ACK 1 MB ahead acknowledges what was never sent.
    let ack = TcpSegment {
        ack: pod.wrapping_add(1 << 20),
        ..peer_segment(ACK, peer)
    };
    assert_eq!(dp.pod_receives(&from_peer(f, ack)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(state(&dp), TcpState::Established);
}

/// An ACK from the peer advertising its window of 64 240 bytes: scaled, unlike the SYN/ACK's
/// (RFC 7323 never scales a SYN's window), when both sides offered scaling.
fn peer_window_update(dp: &LoopbackDatapath, f: Family) {
    let (_, peer) = next_seq();
    assert_eq!(
        dp.pod_receives(&from_peer(f, peer_segment(ACK, peer))),
        ACCEPT
    );
}

/// Data from the pod 1 MB past its first sequence number: beyond the peer's unscaled window of
/// 64 240 bytes, within it scaled by 2^9.
fn pod_data_one_megabyte_ahead(f: Family) -> Vec<u8> {
    let (pod, peer) = next_seq();
    from_pod(
        f,
        TcpSegment {
            bits: PSH | ACK,
            seq: pod.wrapping_add(1 << 20),
            ack: peer,
            payload: vec![0; 100],
            ..TcpSegment::default()
        },
    )
}

fn window_scale_options_are_read_and_widen_the_window(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake_with(&dp, f, wscale_and_sack_perm(7), wscale_and_sack_perm(9));
    let e = dp.conn().entry;
    assert_eq!((e.seen[0].td_scale, e.seen[1].td_scale), (7, 9), "{e:?}");
    for side in e.seen {
        assert_eq!(
            side.flags & (SIDE_WINDOW_SCALE | SIDE_SACK_PERM),
            SIDE_WINDOW_SCALE | SIDE_SACK_PERM,
            "{e:?}"
        );
    }
    // The peer's window is 64 240 << 9 bytes: data 1 MB ahead is in it.
    peer_window_update(&dp, f);
    assert_eq!(dp.pod_sends(&pod_data_one_megabyte_ahead(f)), ACCEPT);
}

fn window_scale_offered_by_one_side_only_is_not_used(f: Family) {
    // RFC 7323: scaling holds only when both SYNs carry the option.
    let mut dp = LoopbackDatapath::load(Some(&client()));
    handshake_with(&dp, f, wscale_and_sack_perm(7), vec![]);
    let e = dp.conn().entry;
    assert_eq!((e.seen[0].td_scale, e.seen[1].td_scale), (0, 0), "{e:?}");
    peer_window_update(&dp, f);
    assert_eq!(dp.pod_sends(&pod_data_one_megabyte_ahead(f)), DROP);
    dp.assert_denied(DenyReason::Invalid);
}

fn sack_blocks_count_when_sack_was_permitted(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    handshake_with(&dp, f, wscale_and_sack_perm(0), wscale_and_sack_perm(0));
    let (pod, peer) = next_seq();
    // The pod sends 2 000 bytes; the peer acknowledges none of them but selectively the last
    // 1 000 (a SACK block): its ACK is in the window.
    let data = TcpSegment {
        bits: PSH | ACK,
        seq: pod,
        ack: peer,
        payload: vec![0; 2000],
        ..TcpSegment::default()
    };
    assert_eq!(dp.pod_sends(&from_pod(f, data)), ACCEPT);
    let (left, right) = (pod.wrapping_add(1000), pod.wrapping_add(2000));
    let mut sack = vec![1, 1, 5, 10];
    sack.extend(left.to_be_bytes());
    sack.extend(right.to_be_bytes());
    let sacked = TcpSegment {
        options: sack.clone(),
        ..peer_segment(ACK, peer)
    };
    assert_eq!(dp.pod_receives(&from_peer(f, sacked)), ACCEPT);
    assert_eq!(
        dp.conn().entry.seen[1].td_maxack,
        pod,
        "the ACK is unchanged"
    );
    // A SACK block beyond all the pod sent is refused like such an ACK.
    let mut beyond = vec![1, 1, 5, 10];
    beyond.extend(left.wrapping_add(1 << 20).to_be_bytes());
    beyond.extend(right.wrapping_add(1 << 20).to_be_bytes());
    let bogus = TcpSegment {
        options: beyond,
        ..peer_segment(ACK, peer)
    };
    assert_eq!(dp.pod_receives(&from_peer(f, bogus)), DROP);
    dp.assert_denied(DenyReason::Invalid);
}
