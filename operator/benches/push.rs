//! Apply-to-ack latency of the push server with 200 agents on loopback (issue 4's benchmark:
//! p99 < 100 ms). Each agent is a real operator link (mTLS, one stream) whose sink applies
//! updates with the agent's own acceptance logic (`convert::update` + `DesiredState::apply`).
//! The latency is what the server reports to its metrics hook: from `set_node_plan` to the ack
//! of a version carrying the change.
//!
//! Scenarios: every node's plan changes at once (a pod added on each of the 200 nodes, the worst
//! burst a cluster-wide group change causes), repeated for several rounds; one node changing
//! at a time on an otherwise idle server; and the widest pod change, a scraper pod's new address
//! in the address set every policy of every node names (only the set travels; the agent refolds
//! the three policies naming it).
//!
//! `cargo bench -p kubesg-operator --bench push` (prints a table; not a test: no assertion).

#[path = "../tests/push_support/mod.rs"]
mod push_support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kubesg_operator::{
    model::ObjectKey,
    plan::{NodePlan, PodPlan},
    push::{PushObserver, PushServer, PushSettings},
};
use kubesg_testkit::certs::TempPki;
use push_support::{web_plan, web_policy, web_policy_id, AgentSink, TestAgent, TestServer};
use tokio::sync::watch;

const AGENTS: usize = 200;
const ROUNDS: usize = 20;
const SINGLE_CHANGES: usize = 200;
/// Pods per node before the rounds add one each.
const PODS: usize = 30;
/// The set every policy names (the monitoring pods that scrape every pod) and its size.
const SCRAPERS_SET: &str = "pods:monitoring:scrapers";
const SCRAPERS: usize = 15;

/// Collects the server's latency observations.
struct Collector {
    latencies: Mutex<Vec<Duration>>,
    count: watch::Sender<usize>,
}

impl PushObserver for Collector {
    fn push_latency(&self, _node: &str, latency: Duration) {
        self.latencies.lock().unwrap().push(latency);
        self.count.send_modify(|c| *c += 1);
    }
}

impl Collector {
    /// Waits until `n` observations in total, then takes them.
    async fn take(&self, n: usize) -> Vec<Duration> {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|c| *c >= n))
            .await
            .expect("every ack arrives")
            .expect("collector alive");
        std::mem::take(&mut *self.latencies.lock().unwrap())
    }
}

/// A node's plan: `PODS + extra` pods over three policies (two groups' rules each), each
/// admitting the scraper set too, whose last address is 10.200.1.`moved` (`moved` < 256).
fn node_plan(node: usize, extra: usize, moved: usize) -> NodePlan {
    let names: Vec<String> = (0..PODS + extra)
        .map(|i| format!("n{node}-pod{i}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut plan = web_plan(&refs, 443, 1);
    for (port, generation) in [(8080, 2), (5432, 3)] {
        plan.policies
            .insert(web_policy_id(port), Arc::new(web_policy(port, generation)));
    }
    for policy in plan.policies.values_mut() {
        Arc::make_mut(policy).ingress[0].sets = vec![SCRAPERS_SET.into()];
    }
    let scrapers = (1..SCRAPERS)
        .map(|i| format!("10.200.0.{i}/32"))
        .chain(std::iter::once(format!("10.200.1.{moved}/32")))
        .map(|a| a.parse().expect("an address"));
    plan.sets
        .insert(SCRAPERS_SET.into(), Arc::new(scrapers.collect()));
    let ids: Vec<String> = plan.policies.keys().cloned().collect();
    for (i, name) in names.iter().enumerate() {
        plan.pods.insert(
            ObjectKey::new("shop", name.clone()),
            PodPlan {
                uid: format!("uid-{name}"),
                policy: Some(ids[i % ids.len()].clone()),
                set_up: true,
            },
        );
    }
    plan
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn row(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "| {name:<40} | {:>7} | {:>8} | {:>8} | {:>8} |",
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap()),
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let pki = TempPki::generate().expect("test PKI");
    let collector = Arc::new(Collector {
        latencies: Mutex::new(Vec::new()),
        count: watch::Sender::new(0),
    });
    let server = PushServer::with_observer(PushSettings::default(), collector.clone());
    let s = TestServer::start(&pki, server, "127.0.0.1:0".parse().unwrap()).await;
    let nodes: Vec<String> = (0..AGENTS).map(|i| format!("node-{i:03}")).collect();
    for (i, node) in nodes.iter().enumerate() {
        s.server.set_node_plan(node, node_plan(i, 0, 0));
    }
    let started = Instant::now();
    let agents: Vec<TestAgent> = nodes
        .iter()
        .map(|node| {
            TestAgent::start(
                node,
                &s.url(),
                pki.agent_tls_for(node).unwrap(),
                AgentSink::new(),
            )
        })
        .collect();
    let mut total = AGENTS;
    let connect = collector.take(total).await;
    let connect_time = started.elapsed();

    // Every node changes at once, round after round.
    let mut burst = Vec::new();
    let mut round_times = Vec::new();
    for round in 1..=ROUNDS {
        let started = Instant::now();
        for (i, node) in nodes.iter().enumerate() {
            s.server.set_node_plan(node, node_plan(i, round, 0));
        }
        total += AGENTS;
        burst.extend(collector.take(total).await);
        round_times.push(started.elapsed());
    }

    // One node at a time.
    let mut single = Vec::new();
    let mut extra = vec![ROUNDS; AGENTS];
    for k in 0..SINGLE_CHANGES {
        let i = k % AGENTS;
        extra[i] = ROUNDS + 1 + k / AGENTS;
        s.server.set_node_plan(&nodes[i], node_plan(i, extra[i], 0));
        total += 1;
        single.extend(collector.take(total).await);
    }

    // A scraper moves: every node's set changes at once, nothing else does.
    let mut moved = Vec::new();
    for round in 1..=ROUNDS {
        for (i, node) in nodes.iter().enumerate() {
            s.server.set_node_plan(node, node_plan(i, extra[i], round));
        }
        total += AGENTS;
        moved.extend(collector.take(total).await);
    }

    for (node, agent) in nodes.iter().zip(&agents) {
        let status = s.server.node_status(node).expect("node known");
        assert!(status.up_to_date, "{node} is behind");
        push_support::assert_agent_has(&agent.sink, &status.acked.expect("acked").plan);
    }

    println!(
        "push apply-to-ack latency, {AGENTS} agents (operator_link over mTLS on loopback), \
         {PODS}+ pods and 3 policies per node, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| {:<40} | {:>7} | {:>8} | {:>8} | {:>8} |",
        "scenario", "samples", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "|{:-<42}|{:->9}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", ""
    );
    row(
        &format!("first snapshot ({AGENTS} agents dial, mTLS)"),
        connect,
    );
    row(
        &format!("all {AGENTS} nodes change at once ({ROUNDS} rounds)"),
        burst,
    );
    row("one node changes at a time", single);
    row(
        &format!("scraper set moves on all {AGENTS} ({ROUNDS} rounds)"),
        moved,
    );
    round_times.sort();
    println!();
    println!(
        "connect + first snapshot of all {AGENTS} agents: {} ms; one burst round (set all \
         {AGENTS} plans → last ack): p50 {} ms, max {} ms",
        ms(connect_time),
        ms(percentile(&round_times, 0.5)),
        ms(*round_times.last().unwrap()),
    );
    drop(agents);
}
