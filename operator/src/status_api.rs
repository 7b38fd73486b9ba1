//! The API status writer: server-side applies each SecurityGroup's `status` subresource (field
//! manager [`FIELD_MANAGER`]) and emits Kubernetes Events, in the shape of kube-rs controllers:
//! a [`Context`] carries the client, the event recorder, what is known of each group and the
//! metrics, and [`write_status`] is a free function that reads the world (the group's current
//! status, fetched once and then remembered) rather than trusting an event.
//!
//! - A status is written only when it differs from the one the group has: an unchanged status
//!   costs no request (after the first read), and transition times stay put because
//!   [`group_status`] keeps them from the previous status.
//! - A Warning Event `InvalidSpec` when a group is not Accepted, a Normal Event `Programmed` when
//!   every concerned node enforces it: once per generation, since both are emitted only when
//!   the group's previous status did not already say so for that generation (which also holds
//!   across operator restarts: the previous status is on the object).
//! - A Warning Event `ProgrammingRefused` when a node refused (NACKed) the version carrying the
//!   group, with the nodes and the agents' reasons: once per generation and set of refusals.
//! - A Warning Event `NotEnforced` on a Pod its node's agent does not enforce (no endpoint, or
//!   an endpoint under another uid: [`crate::coverage`]), once per pod and reason while this
//!   replica leads.
//! - A NetworkPolicy has no status to write: the same conditions are computed and kept in
//!   memory, logged, and told by the same Events on the NetworkPolicy (`kubectl events --for
//!   networkpolicy/NAME` shows them). Memory does not survive the operator, so a new leader
//!   tells each policy's current state once more.
//! - No finalizers: deleting a group needs no cleanup (the next compile drops it from every
//!   plan), so a deleted group is simply forgotten, never written again.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{core::v1::ObjectReference, networking::v1::NetworkPolicy},
    jiff::Timestamp,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client, Resource,
};
use tracing::{info, warn};

use crate::{
    coverage::Gap,
    crd::{SecurityGroup, SecurityGroupStatus},
    metrics::Metrics,
    model::ObjectKey,
    netpol,
    plan::GroupReport,
    status::{group_status, reason as status_reason, NodeAcks},
    status_writer::{StatusSink, WriteError},
};

/// The controller name in Events (`reportingController`).
pub const CONTROLLER: &str = "kubesg.io/operator";

/// The field manager of the status the operator applies (`kubectl get sg NAME
/// --show-managed-fields` names it).
pub const FIELD_MANAGER: &str = "kubesg-operator";

/// Reason of the Warning Event of a group whose spec is invalid.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Reason of the Normal Event of a group every concerned node enforces.
pub const PROGRAMMED: &str = "Programmed";

/// Reason of the Warning Event of a group some node refused to program (NACK).
pub const PROGRAMMING_REFUSED: &str = "ProgrammingRefused";

/// Reason of the Warning Event of a pod its node's agent does not enforce
/// ([`crate::coverage`]).
pub const NOT_ENFORCED: &str = "NotEnforced";

/// What is known of a group on the API server.
#[derive(Clone, Debug)]
struct Known {
    /// The object, for Events (`regarding`).
    reference: ObjectReference,
    /// Its status as last read or written.
    status: Option<SecurityGroupStatus>,
}

/// What [`write_status`] needs: the client, the recorder, what it knows and the metrics.
pub struct Context {
    client: Client,
    reporter: Reporter,
    known: BTreeMap<ObjectKey, Known>,
    metrics: Metrics,
}

impl Context {
    /// A context on `client`; Events name `instance` (the pod) as the reporting instance.
    pub fn new(client: Client, instance: &str, metrics: Metrics) -> Self {
        Context {
            client,
            reporter: Reporter {
                controller: CONTROLLER.into(),
                instance: Some(instance.into()),
            },
            known: BTreeMap::new(),
            metrics,
        }
    }
}

/// What [`write_status`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The status was already right.
    Unchanged,
    /// The status was written (a NetworkPolicy's: recorded and logged).
    Written,
    /// The group does not exist (any more): nothing written.
    Gone,
}

/// Whether `status` has condition `type_` with `value` for `generation`.
fn says(status: Option<&SecurityGroupStatus>, type_: &str, value: &str, generation: i64) -> bool {
    status.is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == type_ && c.status == value && c.observed_generation == Some(generation)
        })
    })
}

/// The condition `type_` of `status`.
fn condition<'a>(
    status: &'a SecurityGroupStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Event notes are limited to 1 kB by the API.
fn note(message: &str) -> String {
    let mut end = message.len().min(1000);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

/// What the API server holds of object `name` (its reference for Events and, through
/// `status`, its status); `None` when it does not exist.
async fn read_known<K>(
    api: &Api<K>,
    kind: &K::DynamicType,
    name: &str,
    status: impl FnOnce(K) -> Option<SecurityGroupStatus>,
) -> Result<Option<Known>, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?.map(|object| {
        let mut reference = object.object_ref(kind);
        reference.resource_version = None;
        Known {
            reference,
            status: status(object),
        }
    }))
}

/// The status a stored SecurityGroup holds; `None` when it has none or one this version cannot
/// read (the next write replaces it).
fn stored_status(sg: DynamicObject) -> Option<SecurityGroupStatus> {
    serde_json::from_value(sg.data.get("status")?.clone()).ok()
}

/// What the API server holds of a group, as a reflector store gives it: what
/// [`write_stored`] needs instead of reading it.
#[derive(Clone, Debug)]
pub struct Stored(Known);

impl Stored {
    /// A stored SecurityGroup (untyped, as the source reads them).
    pub fn group(sg: &DynamicObject) -> Self {
        let kind = ApiResource::erase::<SecurityGroup>(&());
        let mut reference = sg.object_ref(&kind);
        reference.resource_version = None;
        Stored(Known {
            reference,
            status: stored_status(sg.clone()),
        })
    }

    /// A stored NetworkPolicy (it has no status: what was computed is kept in memory).
    pub fn policy(np: &NetworkPolicy) -> Self {
        let mut reference = np.object_ref(&());
        reference.resource_version = None;
        Stored(Known {
            reference,
            status: None,
        })
    }
}

impl Context {
    /// Forgets what was written of `key` (it is gone).
    pub fn forget(&mut self, key: &ObjectKey) {
        self.known.remove(key);
    }

    /// Forgets what was written of every group (another leader may have written since).
    pub fn forget_all(&mut self) {
        self.known.clear();
    }
}

/// Writes `key`'s status as [`write_status`] does, from `stored`, what the API server holds
/// (a controller's store), instead of reading it. What this context wrote to the same object
/// (same uid) counts as the previous status when it has it: the store may not have seen the
/// context's own last write yet.
pub async fn write_stored(
    ctx: &mut Context,
    key: &ObjectKey,
    report: &GroupReport,
    acks: &BTreeMap<String, NodeAcks>,
    now: Timestamp,
    stored: Stored,
) -> Result<Outcome, kube::Error> {
    let Stored(stored) = stored;
    let known = match ctx.known.get(key) {
        Some(k) if k.reference.uid == stored.reference.uid => k.clone(),
        _ => stored,
    };
    write_known(ctx, key, report, acks, now, known).await
}

/// Writes `key`'s status from `report` and `acks` if it changed, and emits the Events the
/// change calls for.
pub async fn write_status(
    ctx: &mut Context,
    key: &ObjectKey,
    report: &GroupReport,
    acks: &BTreeMap<String, NodeAcks>,
    now: Timestamp,
) -> Result<Outcome, kube::Error> {
    // Untyped, as the source reads SecurityGroups: a group whose spec this version cannot read
    // still gets its status (it says why), which a typed read or patch response would fail on.
    let kind = ApiResource::erase::<SecurityGroup>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &key.namespace, &kind);
    // A generation below the one last seen means the group was deleted and recreated under the
    // same name (a new object, a new uid): read it again.
    let stale = ctx.known.get(key).is_some_and(|k| {
        k.status
            .as_ref()
            .and_then(|s| s.observed_generation)
            .is_some_and(|g| g > report.generation)
    });
    let policy = netpol::name(key);
    let read = match (ctx.known.get(key), policy) {
        (Some(k), _) if !stale => Some(k.clone()),
        (_, Some(name)) => {
            let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &key.namespace);
            read_known(&policies, &(), name, |_| None).await?
        }
        (_, None) => read_known(&api, &kind, &key.name, stored_status).await?,
    };
    let Some(known) = read else {
        ctx.known.remove(key);
        return Ok(Outcome::Gone);
    };
    write_known(ctx, key, report, acks, now, known).await
}

/// The write of [`write_status`] once `known` holds what the API server has.
async fn write_known(
    ctx: &mut Context,
    key: &ObjectKey,
    report: &GroupReport,
    acks: &BTreeMap<String, NodeAcks>,
    now: Timestamp,
    known: Known,
) -> Result<Outcome, kube::Error> {
    let kind = ApiResource::erase::<SecurityGroup>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &key.namespace, &kind);
    let policy = netpol::name(key);
    let previous = known.status.as_ref();
    let status = group_status(key, report, acks, previous, now);
    let outcome = if previous == Some(&status) {
        Outcome::Unchanged
    } else if policy.is_some() {
        log_status(key, &status);
        Outcome::Written
    } else {
        // Server-side apply as the operator's field manager: it owns the status fields it
        // writes (a field it stops writing is removed), and conditions of other types, which
        // other controllers may own, are kept (the CRD makes `conditions` a map keyed by type).
        // Forced: the operator is the status's authority for the fields it writes.
        let patch = serde_json::json!({
            "apiVersion": SecurityGroup::api_version(&()),
            "kind": SecurityGroup::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&key.name, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => ctx.metrics.status_write(true),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                ctx.known.remove(key);
                return Ok(Outcome::Gone);
            }
            Err(e) => {
                ctx.metrics.status_write(false);
                return Err(e);
            }
        }
        log_status(key, &status);
        Outcome::Written
    };
    let generation = report.generation;
    let mut events = Vec::new();
    if let Some(c) = condition(&status, "Accepted").filter(|c| c.status == "False") {
        if !says(previous, "Accepted", "False", generation) {
            events.push((
                EventType::Warning,
                INVALID_SPEC,
                "Validate",
                c.message.clone(),
            ));
        }
    }
    if let Some(c) = condition(&status, "Programmed").filter(|c| c.status == "True") {
        if !says(previous, "Programmed", "True", generation) {
            events.push((EventType::Normal, PROGRAMMED, "Program", c.message.clone()));
        }
    }
    if let Some(c) = condition(&status, "Programmed")
        .filter(|c| c.status == "False" && c.reason == status_reason::REFUSED)
    {
        // The message names the refusing nodes and their reasons: a new refusal is news.
        let already = previous
            .and_then(|p| condition(p, "Programmed"))
            .is_some_and(|p| {
                p.status == c.status
                    && p.reason == c.reason
                    && p.message == c.message
                    && p.observed_generation == Some(generation)
            });
        if !already {
            events.push((
                EventType::Warning,
                PROGRAMMING_REFUSED,
                "Program",
                c.message.clone(),
            ));
        }
    }
    for (type_, reason, action, message) in events {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note(&message)),
            action: action.into(),
            secondary: None,
        };
        // A recorder per Event: a kept one would fold a later generation's Event (same type,
        // reason and object) into the first one's series, which keeps the first note; each
        // generation's Event is emitted once anyway. Events are best effort: the status already
        // says it.
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        match recorder.publish(&event, &known.reference).await {
            Ok(()) => ctx.metrics.event(reason),
            Err(e) => warn!(
                group = %netpol::describe(key),
                reason,
                error = %e,
                "could not emit an Event"
            ),
        }
    }
    ctx.known.insert(
        key.clone(),
        Known {
            reference: known.reference,
            status: Some(status),
        },
    );
    Ok(outcome)
}

fn log_status(key: &ObjectKey, status: &SecurityGroupStatus) {
    let describe = |t: &str| {
        condition(status, t)
            .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
            .unwrap_or_default()
    };
    info!(
        group = %netpol::describe(key),
        generation = status.observed_generation,
        members = status.members,
        accepted = %describe("Accepted"),
        programmed = %describe("Programmed"),
        "status written"
    );
}

impl StatusSink for Context {
    async fn publish(
        &mut self,
        key: &ObjectKey,
        report: &GroupReport,
        acks: &BTreeMap<String, NodeAcks>,
        now: Timestamp,
    ) -> Result<(), WriteError> {
        write_status(self, key, report, acks, now).await?;
        Ok(())
    }

    async fn forget(&mut self, key: &ObjectKey) {
        self.known.remove(key);
    }

    fn reset(&mut self) {
        self.known.clear();
    }

    async fn pod_not_enforced(&mut self, node: &str, pod: &ObjectKey, gap: &Gap) {
        Context::pod_not_enforced(self, node, pod, gap).await;
    }
}

impl Context {
    /// Tells, in a Warning Event `NotEnforced` on the pod, that `node`'s agent does not
    /// enforce it, and why.
    pub async fn pod_not_enforced(&self, node: &str, pod: &ObjectKey, gap: &Gap) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: NOT_ENFORCED.into(),
            note: Some(note(&format!("not enforced on node {node}: {gap}"))),
            action: "Enforce".into(),
            secondary: None,
        };
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        match recorder.publish(&event, &reference).await {
            Ok(()) => self.metrics.event(NOT_ENFORCED),
            Err(e) => warn!(pod = %pod, node, error = %e, "could not emit an Event"),
        }
    }
}
