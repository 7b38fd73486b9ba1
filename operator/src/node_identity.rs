//! Which node an agent may speak for. A stream's Hello names a node; whoever speaks for a node
//! reads its plan and acks for it (the status then says Programmed), so the claim must be
//! proven, by one of:
//!
//! - a client certificate naming the node (CN `system:node:NAME` as the kubelet's, CN `NAME`, or
//!   a DNS name `NAME`): per-node certificates, as manifests mode's test PKI issues them;
//! - a node token in the stream's metadata ([`kubesg_proto::NODE_TOKEN_METADATA`]): in a cluster
//!   the chart issues one certificate to the whole DaemonSet, so each agent also sends its pod's
//!   projected ServiceAccount token; [`KubeTokenReviewer`] has the API server review it
//!   (TokenReview, with the operator's audience) and takes the node from what the API server
//!   binds the token to (`authentication.kubernetes.io/node-name`), never from the agent.
//!
//! Each refusal has a [`Refusal::reason`] for the metric and a message for the agent and the log.

use std::fmt;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{api::PostParams, Api, Client};

/// The audience the chart's projected agent tokens carry; a token minted for another audience
/// (the API server's own, another product's) is refused.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "kubesg-operator";

/// The user-info extra where the API server puts the node of the pod a token is bound to
/// (Kubernetes 1.30 and later; always on since 1.32).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Reviews a node token; the operator's is [`KubeTokenReviewer`], tests use their own.
#[tonic::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    /// The node `token` proves, or why it proves none.
    async fn node_of(&self, token: &str) -> Result<String, Refusal>;
}

/// Why a stream may not speak for the node its Hello names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Neither the certificate nor a token names the node.
    #[error("the client certificate ({identity}) does not name node {node} and the stream carries no node token")]
    NoProof {
        /// The certificate's names.
        identity: String,
        /// The node the Hello names.
        node: String,
    },
    /// The token proves another node.
    #[error("the node token is node {proven}'s, not node {claimed}'s")]
    OtherNode {
        /// The node the token is bound to.
        proven: String,
        /// The node the Hello names.
        claimed: String,
    },
    /// The token is not a valid agent token (expired, another audience, another account, bound
    /// to no node, not for this cluster).
    #[error("the node token was refused: {0}")]
    InvalidToken(String),
    /// The token could not be reviewed (API server unreachable, no permission); the agent
    /// retries.
    #[error("the node token could not be reviewed: {0}")]
    ReviewFailed(String),
    /// A token arrived where nothing can review it (manifests mode has no API server).
    #[error("the stream carries a node token but this operator has no API server to review it; the client certificate ({identity}) must name node {node}")]
    NoReviewer {
        /// The certificate's names.
        identity: String,
        /// The node the Hello names.
        node: String,
    },
}

impl Refusal {
    /// The `reason` label of `kubesg_operator_agent_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoProof { .. } | Refusal::NoReviewer { .. } => "no-proof",
            Refusal::OtherNode { .. } => "other-node",
            Refusal::InvalidToken(_) => "invalid-token",
            Refusal::ReviewFailed(_) => "review-failed",
        }
    }
}

/// How a stream proved its node, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The client certificate names it.
    Certificate,
    /// The API server bound the token to it.
    Token,
}

impl fmt::Display for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proof::Certificate => "certificate",
            Proof::Token => "token",
        })
    }
}

/// Whose tokens prove nodes, in a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTokens {
    /// The audience the tokens must carry.
    pub audience: String,
    /// The agents' ServiceAccount's namespace.
    pub namespace: String,
    /// The agents' ServiceAccount.
    pub service_account: String,
}

/// Reviews node tokens with the API server (`authentication.k8s.io/v1` TokenReview; the
/// operator's RBAC allows `create` on `tokenreviews`).
pub struct KubeTokenReviewer {
    client: Client,
    audience: String,
    /// `system:serviceaccount:NAMESPACE:NAME` of the agents.
    username: String,
}

impl KubeTokenReviewer {
    /// Accepts tokens for the audience of the agents' ServiceAccount only: a token of
    /// any other pod of the cluster, bound to a node too, proves nothing about agents.
    pub fn new(client: Client, agents: &AgentTokens) -> Self {
        KubeTokenReviewer {
            client,
            audience: agents.audience.clone(),
            username: format!(
                "system:serviceaccount:{}:{}",
                agents.namespace, agents.service_account
            ),
        }
    }
}

#[tonic::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::ReviewFailed(e.to_string()))?;
        let status = reviewed
            .status
            .ok_or_else(|| Refusal::ReviewFailed("the API server returned no status".into()))?;
        if status.authenticated != Some(true) {
            return Err(Refusal::InvalidToken(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .as_deref()
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(Refusal::InvalidToken(format!(
                "not for audience {}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(Refusal::InvalidToken(format!(
                "it is {username}'s, not the agents' ({})",
                self.username
            )));
        }
        user.extra
            .as_ref()
            .and_then(|extra| extra.get(NODE_NAME_EXTRA))
            .and_then(|nodes| nodes.first())
            .filter(|node| !node.is_empty())
            .cloned()
            .ok_or_else(|| {
                Refusal::InvalidToken(
                    "it is bound to no node (the agent must send its pod's projected token)".into(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_which_node_and_why() {
        let other = Refusal::OtherNode {
            proven: "node-b".into(),
            claimed: "node-a".into(),
        };
        assert_eq!(other.reason(), "other-node");
        assert_eq!(
            other.to_string(),
            "the node token is node node-b's, not node node-a's"
        );
        let none = Refusal::NoProof {
            identity: "CN=kubesg-agent".into(),
            node: "node-a".into(),
        };
        assert_eq!(none.reason(), "no-proof");
        assert!(none.to_string().contains("does not name node node-a"));
    }
}
