//! The one typed handle on the datapath's maps. Everything in the agent reaches a map through
//! [`Maps`], never through `map("NAME")` strings, so the names live in one place.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf,
    },
    Ebpf,
};
use kubesg_common::{
    config::Config,
    conntrack::{CtEntry, CtKey},
    endpoint::{CachedEndpoint, Endpoint},
    event::Counters,
    fragment::{FragKey, FragVerdict},
    policy::{ClassSet, Layers, LayersKey, PeerKey, PortKey},
    source::SourceKey,
};

use crate::ct_counts::CtCounts;

/// Map names, as defined in `dataplane/ebpf/src/maps.rs` and as pinned under `<pin dir>/maps/`.
pub mod names {
    /// Pod interfaces by ifindex.
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// Direct-mapped copy of ENDPOINTS for the fast path.
    pub const ENDPOINT_CACHE: &str = "ENDPOINT_CACHE";
    /// Further addresses of pods (source check).
    pub const SOURCES: &str = "SOURCES";
    /// Connection tracking.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Conntrack entries held by each endpoint.
    pub const CT_COUNTS: &str = "CT_COUNTS";
    /// Peer prefixes of every policy.
    pub const POLICY_PEERS: &str = "POLICY_PEERS";
    /// Single-address peers of every policy.
    pub const POLICY_HOSTS: &str = "POLICY_HOSTS";
    /// Port prefixes of every policy.
    pub const POLICY_PORTS: &str = "POLICY_PORTS";
    /// What layered policies require of each layer.
    pub const POLICY_LAYERS: &str = "POLICY_LAYERS";
    /// First-fragment verdicts.
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// Settings.
    pub const CONFIG: &str = "CONFIG";
    /// Per-endpoint counters.
    pub const COUNTERS: &str = "COUNTERS";
    /// Deny events.
    pub const DENY_EVENTS: &str = "DENY_EVENTS";
    /// All of them, in pinning order.
    pub const ALL: [&str; 13] = [
        ENDPOINTS,
        ENDPOINT_CACHE,
        SOURCES,
        CONNTRACK,
        CT_COUNTS,
        POLICY_PEERS,
        POLICY_HOSTS,
        POLICY_PORTS,
        POLICY_LAYERS,
        FRAGMENTS,
        CONFIG,
        COUNTERS,
        DENY_EVENTS,
    ];
}

/// Errors opening the maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The loaded object lacks a map the agent expects: the object and the agent disagree.
    #[error("the eBPF object has no map named {0}")]
    Missing(&'static str),
    /// A pinned map could not be opened (the datapath is not loaded, or not by this agent).
    #[error("cannot open pinned map {path}: {source}")]
    Pinned {
        /// Where the map should be pinned.
        path: PathBuf,
        /// Why it could not be opened.
        source: MapError,
    },
    /// A map has another type or key/value size than this agent was built with.
    #[error("map {name} does not match this agent's definition: {source}")]
    Mismatch {
        /// The map.
        name: &'static str,
        /// The mismatch.
        source: MapError,
    },
}

/// Typed handles on every map (the ring buffer is separate: it has one reader).
pub struct Maps {
    /// ifindex → endpoint (the source of truth).
    pub endpoints: HashMap<MapData, u32, Endpoint>,
    /// ifindex % slots → endpoint (the datapath's fast lookup).
    pub endpoint_cache: Array<MapData, CachedEndpoint>,
    /// Further addresses of pods → 1 (the source check).
    pub sources: HashMap<MapData, SourceKey, u32>,
    /// Connection tracking.
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// Conntrack entries held by each endpoint (by counter slot), mapped into memory.
    pub ct_counts: CtCounts,
    /// Peer prefixes shorter than a host.
    pub peers: LpmTrie<MapData, PeerKey, ClassSet>,
    /// Single-address peers.
    pub hosts: HashMap<MapData, PeerKey, ClassSet>,
    /// Port prefixes.
    pub ports: LpmTrie<MapData, PortKey, ClassSet>,
    /// Layer requirements of layered policies.
    pub layers: HashMap<MapData, LayersKey, Layers>,
    /// First-fragment verdicts.
    pub fragments: HashMap<MapData, FragKey, FragVerdict>,
    /// Settings (index 0).
    pub config: Array<MapData, Config>,
    /// Counters, per CPU.
    pub counters: PerCpuArray<MapData, Counters>,
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<(Self, RingBuf<MapData>), MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing(name));
        let endpoints = take(names::ENDPOINTS)?;
        let endpoint_cache = take(names::ENDPOINT_CACHE)?;
        let sources = take(names::SOURCES)?;
        let conntrack = take(names::CONNTRACK)?;
        let ct_counts = take(names::CT_COUNTS)?;
        let peers = take(names::POLICY_PEERS)?;
        let hosts = take(names::POLICY_HOSTS)?;
        let ports = take(names::POLICY_PORTS)?;
        let layers = take(names::POLICY_LAYERS)?;
        let fragments = take(names::FRAGMENTS)?;
        let config = take(names::CONFIG)?;
        let counters = take(names::COUNTERS)?;
        let events = take(names::DENY_EVENTS)?;
        Ok((
            Self::from_maps([
                endpoints,
                endpoint_cache,
                sources,
                conntrack,
                ct_counts,
                peers,
                hosts,
                ports,
                layers,
                fragments,
                config,
                counters,
            ])?,
            typed(names::DENY_EVENTS, RingBuf::try_from(events))?,
        ))
    }

    /// Opens the maps a running datapath pinned under `pin_dir` (for the CLI, which must read
    /// what the agent's programs see).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MapsError> {
        let open = |name: &'static str| -> Result<Map, MapsError> {
            let path = map_pin_path(pin_dir, name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::Pinned {
                path: path.clone(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| MapsError::Pinned { path, source })
        };
        Self::from_maps([
            open(names::ENDPOINTS)?,
            open(names::ENDPOINT_CACHE)?,
            open(names::SOURCES)?,
            open(names::CONNTRACK)?,
            open(names::CT_COUNTS)?,
            open(names::POLICY_PEERS)?,
            open(names::POLICY_HOSTS)?,
            open(names::POLICY_PORTS)?,
            open(names::POLICY_LAYERS)?,
            open(names::FRAGMENTS)?,
            open(names::CONFIG)?,
            open(names::COUNTERS)?,
        ])
    }

    /// Opens the pinned deny-event ring buffer.
    pub fn open_pinned_events(pin_dir: &Path) -> Result<RingBuf<MapData>, MapsError> {
        let path = map_pin_path(pin_dir, names::DENY_EVENTS);
        let data = MapData::from_pin(&path).map_err(|source| MapsError::Pinned {
            path: path.clone(),
            source,
        })?;
        let map = Map::from_map_data(data).map_err(|source| MapsError::Pinned { path, source })?;
        typed(names::DENY_EVENTS, RingBuf::try_from(map))
    }

    /// Second handles on the same kernel maps (duplicated descriptors), for a thread of its own
    /// such as the conntrack sweeper.
    pub fn try_clone(&self) -> Result<Self, MapsError> {
        fn dup(name: &'static str, data: &MapData) -> Result<Map, MapsError> {
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| MapsError::Mismatch {
                    name,
                    source: MapError::IoError(e),
                })?;
            let data =
                MapData::from_fd(fd).map_err(|source| MapsError::Mismatch { name, source })?;
            Map::from_map_data(data).map_err(|source| MapsError::Mismatch { name, source })
        }
        Self::from_maps([
            dup(names::ENDPOINTS, self.endpoints.map())?,
            dup(names::ENDPOINT_CACHE, self.endpoint_cache.map())?,
            dup(names::SOURCES, self.sources.map())?,
            dup(names::CONNTRACK, self.conntrack.map())?,
            dup(names::CT_COUNTS, self.ct_counts.map())?,
            dup(names::POLICY_PEERS, self.peers.map())?,
            dup(names::POLICY_HOSTS, self.hosts.map())?,
            dup(names::POLICY_PORTS, self.ports.map())?,
            dup(names::POLICY_LAYERS, self.layers.map())?,
            dup(names::FRAGMENTS, self.fragments.map())?,
            dup(names::CONFIG, self.config.map())?,
            dup(names::COUNTERS, self.counters.map())?,
        ])
    }

    fn from_maps(maps: [Map; 12]) -> Result<Self, MapsError> {
        let [endpoints, endpoint_cache, sources, conntrack, ct_counts, peers, hosts, ports, layers, fragments, config, counters] =
            maps;
        Ok(Maps {
            endpoints: typed(names::ENDPOINTS, HashMap::try_from(endpoints))?,
            endpoint_cache: typed(names::ENDPOINT_CACHE, Array::try_from(endpoint_cache))?,
            sources: typed(names::SOURCES, HashMap::try_from(sources))?,
            conntrack: typed(names::CONNTRACK, HashMap::try_from(conntrack))?,
            ct_counts: typed(names::CT_COUNTS, CtCounts::new(ct_counts))?,
            peers: typed(names::POLICY_PEERS, LpmTrie::try_from(peers))?,
            hosts: typed(names::POLICY_HOSTS, HashMap::try_from(hosts))?,
            ports: typed(names::POLICY_PORTS, LpmTrie::try_from(ports))?,
            layers: typed(names::POLICY_LAYERS, HashMap::try_from(layers))?,
            fragments: typed(names::FRAGMENTS, HashMap::try_from(fragments))?,
            config: typed(names::CONFIG, Array::try_from(config))?,
            counters: typed(names::COUNTERS, PerCpuArray::try_from(counters))?,
        })
    }
}

fn typed<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, MapsError> {
    r.map_err(|source| MapsError::Mismatch { name, source })
}

/// Where map `name` is pinned under the datapath's pin directory.
pub fn map_pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("maps").join(name)
}
