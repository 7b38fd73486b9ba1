use kubesg_agent::datapath::{Datapath, DatapathOptions};
#[test]
fn loads() {
    let dp = Datapath::load(&DatapathOptions::default());
    match dp {
        Ok(_) => {}
        Err(e) => {
            let mut s = format!("{e}");
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(x) = src { s.push_str(&format!("\ncaused by: {x}")); src = x.source(); }
            panic!("{s}");
        }
    }
}

#[test]
fn syn_then_ack() {
    use etherparse::PacketBuilder;
    let mut dp = Datapath::load(&DatapathOptions::default()).unwrap();
    dp.set_endpoint(1, None).unwrap();
    let mk = |syn: bool, ack: bool| {
        let mut b = PacketBuilder::ethernet2([1;6],[2;6]).ipv4([192,168,1,5],[192,168,1,7],64).tcp(40000, 23, 1, 1000);
        if syn { b = b.syn(); }
        if ack { b = b.ack(5); }
        let mut v = Vec::new(); b.write(&mut v, &[]).unwrap(); v
    };
    let fd = dp.program_fd("from_pod").unwrap();
    let r = kubesg_agent::testrun::test_run(fd, &mk(true,false), 1, 1).unwrap();
    println!("syn: {r:?}");
    let r = kubesg_agent::testrun::test_run(fd, &mk(false,true), 1, 1).unwrap();
    println!("ack: {r:?}");
    let now = kubesg_agent::clock::now_ns();
    for c in kubesg_agent::conntrack::list(dp.maps()).unwrap() { println!("{}", c.nf_conntrack_line(now)); }
    println!("{:?}", dp.counters(1).unwrap());
    // member with empty policy
    let h = dp.install_policy(&kubesg_agent::policy::CompiledPolicy::default()).unwrap();
    dp.set_endpoint(1, Some(h)).unwrap();
    let fd = dp.program_fd("from_pod").unwrap();
    let mut f = mk(true,false); f[14+12+3] = 9; // change src ip last octet -> new flow
    let r = kubesg_agent::testrun::test_run(fd, &mk(false,true), 1, 1).unwrap();
    println!("member ack (existing conn, policy changed): {r:?}");
    println!("{:?}", dp.counters(1).unwrap());
}

#[test]
fn netns_attach() {
    use kubesg_testkit::node::TestNode;
    use std::io::{Read, Write};
    let mut node = TestNode::new().unwrap();
    let a = node.add_pod("192.168.1.5".parse().unwrap(), "fd00::5".parse().unwrap()).unwrap();
    let b = node.add_pod("192.168.1.7".parse().unwrap(), "fd00::7".parse().unwrap()).unwrap();
    let mut dp = Datapath::load(&DatapathOptions::default()).unwrap();
    let (ia, ib) = (node.pods[a].host_ifindex, node.pods[b].host_ifindex);
    dp.set_endpoint(ia, None).unwrap();
    dp.set_endpoint(ib, None).unwrap();
    node.ns.enter(|| { dp.attach(ia).unwrap(); dp.attach(ib).unwrap(); });
    let l = node.pods[b].ns.enter(|| std::net::TcpListener::bind("0.0.0.0:23").unwrap());
    let mut c = node.pods[a].ns.enter(|| std::net::TcpStream::connect("192.168.1.7:23").unwrap());
    let (mut s, _) = l.accept().unwrap();
    c.write_all(b"hi").unwrap(); let mut buf=[0u8;2]; s.read_exact(&mut buf).unwrap();
    let now = kubesg_agent::clock::now_ns();
    for c in kubesg_agent::conntrack::list(dp.maps()).unwrap() { println!("{} ifindex={}", c.nf_conntrack_line(now), c.key.ifindex); }
    println!("{:?}", dp.counters(ia).unwrap());
}
