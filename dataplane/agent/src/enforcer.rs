//! The node's enforcement: joins what the CNI registered (which pod is on which interface) with
//! what the operator wants (which policy each pod uses) and programs the datapath so it matches.
//!
//! Every change goes through [`Enforcer::program`], which is idempotent and level-triggered: it
//! installs the policies local pods need, points every endpoint at its policy (one atomic map
//! update each), then removes what nothing uses. An operator update is applied transactionally:
//! validated whole first; if programming fails, the endpoints go back to the previous version's
//! policies and the update is refused, so the previous version stays enforced.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use kubesg_common::config::CFG_RECHECK_ON_POLICY_CHANGE;
use kubesg_proto::{pending_deletes, v1alpha1 as pb};
use tracing::{debug, error, info, warn};

use crate::{
    attach, convert,
    datapath::{Datapath, DatapathError, DatapathOptions, InPlaceChange, PolicyHandle},
    desired::{Assignment, DesiredState, Update, UpdateError},
    endpoints::{
        write_atomically, EndpointKey, EndpointRecord, EndpointStore, InvalidEndpoint, PodRef,
    },
    policy::CompiledPolicy,
    startup::Startup,
};

/// What a pod gets between its CNI ADD and the arrival of its rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StartupPolicy {
    /// Nothing passes until the rules arrive (the default: no window without rules).
    Deny,
    /// Everything passes (tracked) until the rules arrive; connections opened meanwhile are then
    /// re-checked against them.
    Allow,
    /// CNI ADD waits for the rules (up to a timeout) before the pod starts; nothing passes
    /// meanwhile.
    Wait,
}

/// Where an endpoint's enforcement stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Its rules (or its non-membership) are programmed; the policy id, if a member.
    Programmed(Option<String>),
    /// Its rules have not arrived; the startup policy applies.
    Pending,
}

/// Errors of the enforcer.
#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    /// The registration is unusable.
    #[error(transparent)]
    Invalid(#[from] InvalidEndpoint),
    /// The datapath refused.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The state directory could not be read or written.
    #[error("state directory: {0}")]
    State(#[from] io::Error),
    /// The interface the CNI named is not there (or has another index).
    #[error("interface {name} (index {ifindex}) does not exist on this node")]
    NoInterface {
        /// Name given.
        name: String,
        /// Index given.
        ifindex: u32,
    },
    /// The interface the CNI named is another attachment's: an ADD must not take over the
    /// programs, counters and tracked connections of another pod's interface.
    #[error(
        "interface {name} (index {ifindex}) belongs to endpoint {owner}; delete that endpoint first"
    )]
    InterfaceOwned {
        /// Name given.
        name: String,
        /// Index given.
        ifindex: u32,
        /// The attachment registered on it and its pod (`<container id>/<ifname> of pod
        /// <namespace>/<name>`).
        owner: String,
    },
    /// The update was refused.
    #[error(transparent)]
    Update(#[from] UpdateError),
}

/// The enforcer's settings.
#[derive(Clone, Debug)]
pub struct EnforcerOptions {
    /// How to load the datapath (production: pinned under /sys/fs/bpf/kubesg).
    pub datapath: DatapathOptions,
    /// Where endpoint records and the last applied state are kept.
    pub state_dir: PathBuf,
    /// What a pod gets before its rules arrive.
    pub startup: Startup,
    /// Where `kubesg-cni` queues the DELs it could not deliver (beside the CNI socket, see
    /// [`kubesg_proto::pending_deletes`]).
    pub pending_deletes: PathBuf,
}

/// The node's enforcement state.
pub struct Enforcer {
    dp: Datapath,
    store: EndpointStore,
    state_file: PathBuf,
    startup: Startup,
    pending_deletes: PathBuf,
    endpoints: BTreeMap<EndpointKey, EndpointRecord>,
    desired: DesiredState,
    /// Policies installed in the datapath, by operator id.
    installed: BTreeMap<String, (CompiledPolicy, PolicyHandle)>,
    /// The empty policy pending members point at under the `deny` and `wait` startup policies.
    deny_all: Option<PolicyHandle>,
    /// The desired state could not be read at start: the endpoints the datapath already has
    /// keep the policies it holds for them (pinned) until the operator's next snapshot, rather
    /// than all get the startup policy (with `allow`, every pod open).
    desired_lost: bool,
    /// Interfaces the datapath enforces that no endpoint record explains (the record lost or
    /// unreadable) and that still exist: denied everything until an ADD registers them again.
    unexplained: BTreeSet<u32>,
    /// A copy of `endpoints`, renewed on every change, for readers that must not take the
    /// enforcer's lock (see [`Enforcer::published_endpoints`]).
    published: PublishedEndpoints,
}

/// The registered endpoints as last published by the enforcer: what a metrics scrape reads
/// instead of locking the enforcer, whose lock every CNI call and policy update needs.
pub type PublishedEndpoints = Arc<RwLock<Vec<EndpointRecord>>>;

impl Enforcer {
    /// Loads the datapath (reusing pinned maps and links), the endpoint records and the last
    /// applied state; forgets endpoints whose interface is gone; programs the rest. After an agent
    /// restart this changes nothing that was right, so established connections live on.
    pub fn open(opts: EnforcerOptions) -> Result<Self, EnforcerError> {
        let dp = Datapath::load(&opts.datapath)?;
        let store = EndpointStore::open(&opts.state_dir.join("endpoints"))?;
        let state_file = opts.state_dir.join("desired.json");
        let mut desired_lost = false;
        let desired = match std::fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                error!(file = %state_file.display(), error = %e,
                       "the desired state cannot be read: keeping what the datapath enforces \
                        (each pod's rules as last applied) until the operator sends a snapshot");
                desired_lost = true;
                DesiredState::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => DesiredState {
                recheck_on_policy_change: true,
                ..DesiredState::default()
            },
            Err(e) => return Err(e.into()),
        };
        let mut enforcer = Enforcer {
            dp,
            store,
            state_file,
            startup: opts.startup,
            pending_deletes: opts.pending_deletes,
            endpoints: BTreeMap::new(),
            desired,
            installed: BTreeMap::new(),
            deny_all: None,
            published: PublishedEndpoints::default(),
            unexplained: BTreeSet::new(),
            desired_lost,
        };
        for rec in enforcer.store.load_all()? {
            if interface_matches(&rec) {
                enforcer.endpoints.insert(rec.key.clone(), rec);
            } else {
                info!(endpoint = %rec.key, pod = %rec.pod, ifindex = rec.host_ifindex,
                      "forgetting an endpoint whose interface is gone");
                enforcer.store.remove(&rec.key)?;
                let _ = enforcer.dp.remove_endpoint(rec.host_ifindex);
                let _ = enforcer.dp.detach(rec.host_ifindex);
            }
        }
        enforcer.publish_endpoints();
        // Endpoints in the (pinned) datapath that no record explains: their record was lost, or
        // could not be read above. One whose interface is gone has nothing left to judge. One
        // whose interface is still there belongs to a pod this agent can no longer name, so it
        // cannot know the pod's rules: rather than leave the pod unfiltered (fail open), its
        // programs stay and it is denied everything until a CNI ADD registers it again.
        let known: BTreeSet<u32> = enforcer
            .endpoints
            .values()
            .map(|r| r.host_ifindex)
            .collect();
        for (ifindex, _) in enforcer.dp.endpoints()? {
            if known.contains(&ifindex) {
                continue;
            }
            match attach::ifname(ifindex) {
                Ok(name) => {
                    error!(ifindex, interface = %name, records = %enforcer.store.dir().display(),
                           "no endpoint record explains this enforced interface (lost or \
                            unreadable): denying all of its traffic until a CNI ADD registers \
                            it again");
                    enforcer.unexplained.insert(ifindex);
                }
                Err(_) => {
                    info!(
                        ifindex,
                        "removing an endpoint no record explains, whose interface is gone"
                    );
                    enforcer.dp.remove_endpoint(ifindex)?;
                    let _ = enforcer.dp.detach(ifindex);
                }
            }
        }
        let desired = enforcer.desired.clone();
        if !enforcer.desired_lost {
            // Without it, the datapath's settings stay as they were too.
            enforcer.apply_settings(&desired)?;
        }
        enforcer.program(&desired)?;
        enforcer.retain_used_policies()?;
        for rec in enforcer.endpoints.values() {
            enforcer.dp.attach(rec.host_ifindex)?;
        }
        for &ifindex in &enforcer.unexplained {
            enforcer.dp.attach(ifindex)?;
        }
        enforcer.dp.finish_conntrack_migration();
        enforcer.apply_pending_deletes()?;
        info!(
            endpoints = enforcer.endpoints.len(),
            version = enforcer.desired.version,
            "enforcement restored"
        );
        Ok(enforcer)
    }

    /// The last applied version of the operator's state.
    pub fn applied_version(&self) -> u64 {
        self.desired.version
    }

    /// The operator's state as last applied.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The datapath, for reading counters and conntrack.
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// The datapath, mutable (conntrack flushes).
    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    /// The startup policy in force, with its exemptions.
    pub fn startup(&self) -> &Startup {
        &self.startup
    }

    /// Every registered endpoint.
    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.endpoints.values()
    }

    /// The endpoint registered under `key`.
    pub fn endpoint(&self, key: &EndpointKey) -> Option<&EndpointRecord> {
        self.endpoints.get(key)
    }

    /// The pods with at least one registered endpoint, once each: what the operator is told the
    /// node enforces.
    pub fn endpoint_pods(&self) -> Vec<PodRef> {
        let pods: BTreeSet<&PodRef> = self.endpoints.values().map(|r| &r.pod).collect();
        pods.into_iter().cloned().collect()
    }

    /// Warns about each endpoint whose pod the operator knows under another uid: it stays
    /// pending (denied) while the operator's status would otherwise look complete.
    fn warn_uid_conflicts<'a>(&self, records: impl IntoIterator<Item = &'a EndpointRecord>) {
        for rec in records {
            if let Some(theirs) = self.desired.other_uid(&rec.pod) {
                warn!(endpoint = %rec.key, pod = %rec.pod, cni_uid = %rec.pod.uid,
                      operator_uid = %theirs,
                      "the operator places a pod of this name with another uid: this endpoint \
                       stays pending (denied) until they agree");
            }
        }
    }

    /// The registered endpoints, kept current by the enforcer, to read without its lock.
    pub fn published_endpoints(&self) -> PublishedEndpoints {
        self.published.clone()
    }

    fn publish_endpoints(&self) {
        let now = self.endpoints.values().cloned().collect();
        *self.published.write().unwrap_or_else(|p| p.into_inner()) = now;
    }

    /// Where the enforcement of `key`'s pod stands.
    pub fn enforcement(&self, key: &EndpointKey) -> Option<Enforcement> {
        let rec = self.endpoints.get(key)?;
        Some(match self.desired.assignment(&rec.pod) {
            Assignment::Unknown => Enforcement::Pending,
            Assignment::NonMember => Enforcement::Programmed(None),
            Assignment::Member(p) => Enforcement::Programmed(Some(p)),
        })
    }

    /// Applies the DELs `kubesg-cni` queued while it could not reach this agent, removing each
    /// file once its endpoint is gone; returns how many were applied. One DEL never holds up the
    /// others: a file that cannot be read, or names no valid attachment, is reported and moved
    /// aside (`.rejected`, kept for inspection); one whose deletion fails is reported and tried
    /// again the next time.
    pub fn apply_pending_deletes(&mut self) -> Result<usize, EnforcerError> {
        let mut applied = 0;
        for pending in pending_deletes::read_all(&self.pending_deletes)? {
            let key = pending
                .key
                .map(|k| convert::endpoint_key(&k))
                .and_then(|k| {
                    k.validate().map_err(|e| e.to_string())?;
                    Ok(k)
                });
            let key = match key {
                Ok(key) => key,
                Err(e) => {
                    let aside = pending.path.with_extension("rejected");
                    warn!(file = %pending.path.display(), moved_to = %aside.display(), error = %e,
                          "rejecting a queued CNI DEL that names no valid attachment");
                    if let Err(e) = std::fs::rename(&pending.path, &aside) {
                        warn!(file = %pending.path.display(), error = %e, "moving the queued DEL aside");
                    }
                    continue;
                }
            };
            info!(endpoint = %key, queued = %pending.path.display(),
                  "applying a CNI DEL queued while the agent was away");
            match self
                .delete_endpoint(&key)
                .and_then(|()| Ok(std::fs::remove_file(&pending.path)?))
            {
                Ok(()) => applied += 1,
                Err(e) => {
                    warn!(endpoint = %key, error = %e, "applying a queued CNI DEL failed; trying again later")
                }
            }
        }
        Ok(applied)
    }

    /// Registers a pod's interface (CNI ADD): persisted, enforced per its rules or the startup
    /// policy, then the programs are attached. A repeated ADD with the same key replaces the
    /// registration, and supersedes a DEL of it still queued. On error nothing of it is left.
    pub fn add_endpoint(&mut self, rec: EndpointRecord) -> Result<Enforcement, EnforcerError> {
        rec.validate()?;
        if !interface_matches(&rec) {
            return Err(EnforcerError::NoInterface {
                name: rec.host_ifname.clone(),
                ifindex: rec.host_ifindex,
            });
        }
        if let Some(owner) = self
            .endpoints
            .values()
            .find(|r| r.key != rec.key && r.host_ifindex == rec.host_ifindex)
        {
            return Err(EnforcerError::InterfaceOwned {
                name: rec.host_ifname.clone(),
                ifindex: rec.host_ifindex,
                owner: format!("{} of pod {}", owner.key, owner.pod),
            });
        }
        // From here on the ADD either registers the attachment or removes it whole (below), so
        // a DEL of it still queued has nothing left to do; one that cannot be dropped fails the
        // ADD before anything changed.
        let wire_key = pb::EndpointKey {
            container_id: rec.key.container_id.clone(),
            ifname: rec.key.ifname.clone(),
        };
        if pending_deletes::forget(&self.pending_deletes, &wire_key)? {
            info!(endpoint = %rec.key, "a queued DEL of this attachment is superseded by its ADD");
        }
        if let Some(old) = self.endpoints.get(&rec.key).cloned() {
            if old.host_ifindex != rec.host_ifindex {
                self.delete_endpoint(&old.key)?;
            }
        }
        self.store.save(&rec)?;
        self.endpoints.insert(rec.key.clone(), rec.clone());
        self.unexplained.remove(&rec.host_ifindex);
        self.publish_endpoints();
        let desired = self.desired.clone();
        let result = self.program(&desired).and_then(|()| {
            self.dp
                .attach(rec.host_ifindex)
                .map_err(EnforcerError::from)
        });
        if let Err(e) = result {
            warn!(endpoint = %rec.key, pod = %rec.pod, error = %e, "registration failed; undoing it");
            let _ = self.delete_endpoint(&rec.key);
            return Err(e);
        }
        let state = self.enforcement(&rec.key).unwrap_or(Enforcement::Pending);
        info!(endpoint = %rec.key, pod = %rec.pod, ifindex = rec.host_ifindex,
              host_ifname = %rec.host_ifname, ips = ?rec.ips, state = ?state, "endpoint added");
        self.warn_uid_conflicts([&rec]);
        if rec.ips.is_empty() {
            warn!(endpoint = %rec.key, pod = %rec.pod,
                  "the CNI result gives this interface no address: what the pod sends on it is \
                   not source-checked");
        }
        Ok(state)
    }

    /// Forgets a pod's interface (CNI DEL): detached, removed from the datapath with its tracked
    /// connections, record deleted. Succeeds when it is already gone.
    pub fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<(), EnforcerError> {
        key.validate()?;
        let Some(rec) = self.endpoints.remove(key) else {
            self.store.remove(key)?;
            return Ok(());
        };
        self.publish_endpoints();
        self.dp.detach(rec.host_ifindex)?;
        self.dp.remove_endpoint(rec.host_ifindex)?;
        self.store.remove(key)?;
        let desired = self.desired.clone();
        self.program(&desired)?;
        info!(endpoint = %key, pod = %rec.pod, "endpoint deleted");
        Ok(())
    }

    /// Whether `key` is registered and its programs attached (CNI CHECK), or what is wrong.
    pub fn check_endpoint(&self, key: &EndpointKey) -> Result<(), String> {
        let rec = self
            .endpoints
            .get(key)
            .ok_or_else(|| format!("endpoint {key} is not registered"))?;
        if !interface_matches(rec) {
            return Err(format!(
                "interface {} (index {}) of {key} is gone",
                rec.host_ifname, rec.host_ifindex
            ));
        }
        match self.dp.endpoint(rec.host_ifindex) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("endpoint {key} is missing from the datapath")),
            Err(e) => return Err(e.to_string()),
        }
        if !self.dp.is_attached(rec.host_ifindex) {
            return Err(format!(
                "the programs of {key} are not attached to {}",
                rec.host_ifname
            ));
        }
        Ok(())
    }

    /// Applies an operator update transactionally: on error the previous version stays
    /// enforced and the error is the NACK's reason.
    pub fn apply_update(&mut self, update: &Update) -> Result<(), EnforcerError> {
        let started = Instant::now();
        let next = self.desired.apply(update)?;
        let previous = self.desired.clone();
        let lost = std::mem::replace(&mut self.desired_lost, false);
        let mut took = ApplyTimes {
            state: started.elapsed(),
            ..ApplyTimes::default()
        };
        let result = self.program(&next).and_then(|()| {
            took.program = started.elapsed() - took.state;
            self.apply_settings(&next)?;
            let json = serde_json::to_vec(&next).map_err(io::Error::other)?;
            write_atomically(&self.state_file, &json)?;
            took.persist = started.elapsed() - took.state - took.program;
            Ok(())
        });
        if let Err(e) = result {
            // Whatever step failed, the NACK promises the previous version: program it again
            // (policies, endpoints and settings), so no half of the refused one stays.
            warn!(version = update.version, error = %e, "update failed; restoring the previous version");
            self.desired_lost = lost;
            let restored = self
                .program(&previous)
                .and_then(|()| self.apply_settings(&previous));
            if let Err(e2) = restored {
                warn!(error = %e2, "restoring the previous version failed too");
            }
            return Err(e);
        }
        self.desired = next;
        // Each conflict once, when the operator (re)places the pod, not at every update.
        let placed: BTreeSet<(&str, &str)> = update
            .upsert_pods
            .iter()
            .map(|(p, _)| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        self.warn_uid_conflicts(
            self.endpoints
                .values()
                .filter(|r| placed.contains(&(r.pod.namespace.as_str(), r.pod.name.as_str()))),
        );
        if lost {
            info!(
                version = update.version,
                "the operator's snapshot replaces what the datapath enforced since the desired \
                   state was lost"
            );
            // The pinned policies of the lost state: nothing points at them any more.
            if let Err(e) = self.retain_used_policies() {
                warn!(error = %e, "could not remove the policies of the lost desired state");
            }
        }
        info!(
            version = update.version,
            snapshot = update.snapshot,
            policies = self.installed.len(),
            took_ms = ms(started.elapsed()),
            state_ms = ms(took.state),
            program_ms = ms(took.program),
            persist_ms = ms(took.persist),
            "update applied"
        );
        Ok(())
    }

    fn apply_settings(&mut self, desired: &DesiredState) -> Result<(), EnforcerError> {
        let mut cfg = self.dp.config()?;
        let before = cfg.flags;
        if desired.recheck_on_policy_change {
            cfg.flags |= CFG_RECHECK_ON_POLICY_CHANGE;
        } else {
            cfg.flags &= !CFG_RECHECK_ON_POLICY_CHANGE;
        }
        if cfg.flags != before {
            self.dp.set_config(&cfg)?;
        }
        Ok(())
    }

    /// Makes the datapath enforce `desired` for the registered endpoints. On error, what was
    /// newly installed is removed again; endpoints already switched stay switched (the caller
    /// programs the previous state to undo them).
    fn program(&mut self, desired: &DesiredState) -> Result<(), EnforcerError> {
        // 1. The policies local pods need, installed (or replaced when their rules changed).
        let mut needed: BTreeMap<String, &CompiledPolicy> = BTreeMap::new();
        let mut any_pending = false;
        for rec in self.endpoints.values() {
            match desired.assignment(&rec.pod) {
                Assignment::Member(id) => {
                    if let Some(p) = desired.policies.get(&id) {
                        needed.insert(id, p);
                    }
                }
                Assignment::Unknown => {
                    any_pending |= self.startup.for_pod(&rec.pod) != StartupPolicy::Allow
                }
                Assignment::NonMember => {}
            }
        }
        // What this call wrote, undone if it fails: policies installed beside the old ones, and
        // policies changed in place (a peer joining a large group: one host entry, not a new
        // copy of the group; `Datapath::update_policy_in_place` says when that is safe).
        let mut undo = Undo::default();
        let mut handles: BTreeMap<String, PolicyHandle> = BTreeMap::new();
        let mut successors = self.successors(desired, &needed)?;
        for (id, policy) in &needed {
            // Installed under this id, or under the id it replaces: the operator names a policy
            // by a hash of its content, so an ipBlock added to a group comes as a new id that
            // every endpoint of the old one moves to.
            let installed = self
                .installed
                .get(id)
                .or_else(|| self.installed.get(&successors.remove(id)?));
            if let Some((old, h)) = installed {
                if old == *policy {
                    handles.insert(id.clone(), *h);
                    continue;
                }
                match self.dp.update_policy_in_place(
                    *h,
                    old,
                    policy,
                    !desired.recheck_on_policy_change,
                ) {
                    Ok(Some(change)) => {
                        debug!(policy = %id, entries = change.entries(), "policy changed in place");
                        undo.in_place.push(change);
                        handles.insert(id.clone(), *h);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.undo(undo);
                        return Err(e.into());
                    }
                }
            }
            match self.dp.install_policy(policy) {
                Ok(h) => {
                    undo.fresh.push(h);
                    handles.insert(id.clone(), h);
                }
                Err(e) => {
                    self.undo(undo);
                    return Err(e.into());
                }
            }
        }
        if (any_pending || !self.unexplained.is_empty()) && self.deny_all.is_none() {
            match self.dp.install_policy(&CompiledPolicy::default()) {
                Ok(h) => self.deny_all = Some(h),
                Err(e) => {
                    self.undo(undo);
                    return Err(e.into());
                }
            }
        }
        // 2. Every endpoint pointed at its target: one atomic map update each; and told what it
        // may send as (its addresses: the source check).
        // While the desired state is lost, the endpoints the datapath already has keep what it
        // holds for them; only new ones (ADDs since) are programmed.
        let keep_as_is: BTreeSet<u32> = if self.desired_lost {
            self.dp.endpoints()?.into_iter().map(|(i, _)| i).collect()
        } else {
            BTreeSet::new()
        };
        let targets: Vec<(u32, Option<PolicyHandle>, Vec<IpAddr>)> = self
            .endpoints
            .values()
            .filter(|rec| !keep_as_is.contains(&rec.host_ifindex))
            .filter_map(|rec| {
                let target = match desired.assignment(&rec.pod) {
                    // Always present: DesiredState::apply checked every reference.
                    Assignment::Member(id) => Some(*handles.get(&id)?),
                    Assignment::NonMember => None,
                    Assignment::Unknown => match self.startup.for_pod(&rec.pod) {
                        StartupPolicy::Allow => None,
                        StartupPolicy::Deny | StartupPolicy::Wait => self.deny_all,
                    },
                };
                let addrs = rec.ips.iter().map(|n| n.addr()).collect();
                Some((rec.host_ifindex, target, addrs))
            })
            .collect();
        for (ifindex, wanted, addrs) in targets {
            let unchanged = self.dp.endpoint(ifindex)?.is_some_and(|ep| {
                ep.policy_id == wanted.map_or(0, |h| h.id)
                    && ep.flags == wanted.map_or(0, |h| h.endpoint_flags())
            });
            let set = if unchanged {
                Ok(())
            } else {
                self.dp.set_endpoint(ifindex, wanted)
            };
            if let Err(e) = set {
                self.undo(undo);
                return Err(e.into());
            }
            // A failure here is this endpoint's alone: it keeps its first address of each family
            // (extra ones are refused, fail closed) and the others are programmed on.
            if let Err(e) = self.dp.set_sources(ifindex, &addrs) {
                let primary = first_of_each_family(&addrs);
                error!(ifindex, error = %e, addresses = ?addrs, kept = ?primary,
                       "could not set this pod's source addresses; only the first of each family pass");
                if let Err(e) = self.dp.set_sources(ifindex, &primary) {
                    error!(ifindex, error = %e, "could not set even those");
                }
            }
        }
        // Interfaces no record explains: denied everything (see `Enforcer::open`).
        let unexplained: Vec<u32> = self.unexplained.iter().copied().collect();
        for ifindex in unexplained {
            if let Err(e) = self.dp.set_endpoint(ifindex, self.deny_all) {
                self.undo(undo);
                return Err(e.into());
            }
        }
        // 3. Nothing points at the old versions any more: remove them.
        let mut installed = BTreeMap::new();
        for (id, h) in &handles {
            if let Some(p) = needed.get(id) {
                installed.insert(id.clone(), ((*p).clone(), *h));
            }
        }
        let still_used: BTreeSet<u32> = installed.values().map(|(_, h)| h.id).collect();
        let stale: Vec<PolicyHandle> = self
            .installed
            .values()
            .map(|(_, h)| *h)
            .filter(|h| !still_used.contains(&h.id))
            .collect();
        self.installed = installed;
        for h in stale {
            if let Err(e) = self.dp.remove_policy(h.id) {
                warn!(policy_id = h.id, error = %e, "could not remove an unused policy");
            }
        }
        Ok(())
    }

    /// For a policy `needed` that is not installed, the installed one it replaces: no longer
    /// needed, and every endpoint on it moves to the new one (so that changing it in place
    /// changes what those endpoints, and only they, are about to get). New id → old id.
    fn successors(
        &self,
        desired: &DesiredState,
        needed: &BTreeMap<String, &CompiledPolicy>,
    ) -> Result<BTreeMap<String, String>, EnforcerError> {
        let by_handle: BTreeMap<u32, &String> = self
            .installed
            .iter()
            .filter(|(id, _)| !needed.contains_key(*id))
            .map(|(id, (_, h))| (h.id, id))
            .collect();
        if by_handle.is_empty() {
            return Ok(BTreeMap::new());
        }
        // Old id → where its endpoints go (`None`: somewhere not a new policy).
        let mut moves: BTreeMap<&String, BTreeSet<Option<&String>>> = BTreeMap::new();
        for rec in self.endpoints.values() {
            let Some(ep) = self.dp.endpoint(rec.host_ifindex)? else {
                continue;
            };
            let Some(old) = by_handle.get(&ep.policy_id) else {
                continue;
            };
            let to = match desired.assignment(&rec.pod) {
                Assignment::Member(id) => needed
                    .get_key_value(&id)
                    .map(|(k, _)| k)
                    .filter(|k| !self.installed.contains_key(*k)),
                Assignment::NonMember | Assignment::Unknown => None,
            };
            moves.entry(old).or_default().insert(to);
        }
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        let mut taken: BTreeSet<&String> = BTreeSet::new();
        for (old, to) in moves {
            let mut to = to.into_iter();
            if let (Some(Some(new)), None) = (to.next(), to.next()) {
                // One old policy per new one: two endpoints' policies merging take a new copy.
                if taken.insert(new) {
                    out.insert(new.clone(), old.clone());
                } else {
                    out.remove(new);
                }
            }
        }
        Ok(out)
    }

    /// Removes the policy entries in the datapath that neither this process installed nor any
    /// endpoint points at (left from before a restart). While the desired state is lost, the
    /// endpoints point at policies no process installed, which stay.
    fn retain_used_policies(&mut self) -> Result<(), EnforcerError> {
        let mut keep: BTreeSet<u32> = self
            .installed
            .values()
            .map(|(_, h)| h.id)
            .chain(self.deny_all.map(|h| h.id))
            .collect();
        if self.desired_lost {
            keep.extend(self.dp.endpoints()?.into_iter().map(|(_, ep)| ep.policy_id));
        }
        self.dp.retain_policies(&keep)?;
        Ok(())
    }

    /// Takes back what a failed [`Enforcer::program`] wrote: the previous version stays in
    /// force.
    fn undo(&mut self, undo: Undo) {
        for h in &undo.fresh {
            if let Err(e) = self.dp.remove_policy(h.id) {
                warn!(policy_id = h.id, error = %e, "could not remove a policy while undoing");
            }
        }
        for change in undo.in_place.into_iter().rev() {
            self.dp.undo_in_place(change);
        }
    }
}

/// Where an update's time went, for its log line: the new desired state computed, the datapath
/// programmed, the state written to disk.
#[derive(Default)]
struct ApplyTimes {
    state: Duration,
    program: Duration,
    persist: Duration,
}

/// Milliseconds with a tenth, for a log field.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// What one [`Enforcer::program`] wrote so far.
#[derive(Default)]
struct Undo {
    fresh: Vec<PolicyHandle>,
    in_place: Vec<InPlaceChange>,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("version", &self.applied_version())
            .finish_non_exhaustive()
    }
}

/// The first IPv4 and the first IPv6 address of `addrs`: what an endpoint holds without the
/// `SOURCES` map.
fn first_of_each_family(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let v4 = addrs.iter().find(|a| a.is_ipv4());
    let v6 = addrs.iter().find(|a| a.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

/// Whether the record's interface exists under its index and name in this namespace.
fn interface_matches(rec: &EndpointRecord) -> bool {
    attach::ifname(rec.host_ifindex).is_ok_and(|n| n == rec.host_ifname)
}

/// The state directory's default (the brief fixes the socket beside it).
pub const DEFAULT_STATE_DIR: &str = "/var/run/kubesg";

/// Where the desired state of `state_dir` is kept (the CLI reads it for `endpoints`/`explain`).
pub fn desired_state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("desired.json")
}
