//! The operator's review of agents' node tokens ([`KubeTokenReviewer`]) against the real API
//! server of `make cluster`: a token of the agents' ServiceAccount, for the operator's audience,
//! bound to a pod on a node proves that node (the API server, not the agent, names it); a token
//! for another audience, of another account, bound to no pod, or garbage proves nothing. The
//! chart test sees the whole path: the installed agent connects with its token
//! (tests/cluster/chart.rs).

use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use kubesg_operator::node_identity::{
    AgentTokens, KubeTokenReviewer, Refusal, TokenReviewer, DEFAULT_TOKEN_AUDIENCE,
};
use kubesg_testkit::{kube::Kube, require_privileged};

/// The test workload image `make cluster` imports (never needs to run here: the token is
/// bound to the pod object).
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.63.0";

/// A client of the cluster from the test's kubeconfig.
async fn client(kube: &Kube) -> Client {
    let kubeconfig = Kubeconfig::read_from(kube.kubeconfig()).expect("the kubeconfig reads");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("the kubeconfig is usable");
    Client::try_from(config).expect("a client")
}

/// `kubectl create token ACCOUNT` in `namespace` with these extra arguments.
fn token(kube: &Kube, namespace: &str, account: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", "token", account, "-n", namespace];
    args.extend_from_slice(extra);
    kube.must(&args).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_agent_accounts_token_bound_to_a_pod_proves_that_pods_node() {
    require_privileged!();
    let kube = Kube::from_env();
    let ns = kube.namespace("kubesg-identity");
    let node = kube.must(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]);
    let node = node.trim();
    kube.must(&["create", "serviceaccount", "kubesg-agent", "-n", &ns.name]);
    kube.must(&["create", "serviceaccount", "other", "-n", &ns.name]);
    for (pod, account) in [("agent", "kubesg-agent"), ("impostor", "other")] {
        kube.must_apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: {ns}\nspec:\n  \
             nodeName: {node}\n  serviceAccountName: {account}\n  automountServiceAccountToken: false\n  \
             restartPolicy: Never\n  containers:\n  - name: pause\n    image: {AGNHOST}\n    \
             args: [pause]\n",
            ns = ns.name
        ));
    }
    let reviewer = KubeTokenReviewer::new(
        client(&kube).await,
        &AgentTokens {
            audience: DEFAULT_TOKEN_AUDIENCE.into(),
            namespace: ns.name.clone(),
            service_account: "kubesg-agent".into(),
        },
    );
    let audience = format!("--audience={DEFAULT_TOKEN_AUDIENCE}");
    let bound = |account: &str, pod: &str| {
        token(
            &kube,
            &ns.name,
            account,
            &[
                &audience,
                "--bound-object-kind=Pod",
                &format!("--bound-object-name={pod}"),
            ],
        )
    };

    // The agent pod's token: the API server names its node.
    let proven = reviewer.node_of(&bound("kubesg-agent", "agent")).await;
    assert_eq!(proven, Ok(node.to_owned()));

    let refused = |result: Result<String, Refusal>, says: &str| match result {
        Err(Refusal::InvalidToken(reason)) => {
            assert!(reason.contains(says), "{reason:?} does not say {says:?}")
        }
        other => panic!("expected a refused token saying {says:?}, got {other:?}"),
    };
    // Another pod's account, bound to a pod on the same node.
    refused(
        reviewer.node_of(&bound("other", "impostor")).await,
        &format!("system:serviceaccount:{}:other", ns.name),
    );
    // The agents' account, but bound to no pod: no node.
    refused(
        reviewer
            .node_of(&token(&kube, &ns.name, "kubesg-agent", &[&audience]))
            .await,
        "bound to no node",
    );
    // A token for the API server's own audience (what an automounted token is).
    refused(
        reviewer
            .node_of(&token(
                &kube,
                &ns.name,
                "kubesg-agent",
                &["--bound-object-kind=Pod", "--bound-object-name=agent"],
            ))
            .await,
        "",
    );
    refused(reviewer.node_of("not-a-token").await, "");
    // Once its pod is gone, the agent pod's token proves nothing.
    let token_of_deleted = bound("kubesg-agent", "agent");
    kube.must(&[
        "delete",
        "pod",
        "agent",
        "-n",
        &ns.name,
        "--grace-period=0",
        "--force",
        "--wait",
    ]);
    refused(reviewer.node_of(&token_of_deleted).await, "");
}
