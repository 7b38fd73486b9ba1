//! Services: traffic to a ClusterIP is judged as traffic to the pods behind it.
//!
//! kube-proxy translates a ClusterIP destination after the packet has left the client's
//! interface, so the client's egress check sees `ClusterIP:servicePort`, which no rule naming
//! pods admits. The operator therefore resolves Services itself (as the AWS network policy
//! agent does): an egress rule admits port `P` of Service `S` on a ClusterIP of family `F` iff
//! `S` has at least one backend with an address of family `F` and the rule admits **every**
//! such backend address on `P`'s protocol and on `P`'s target port as resolved on that backend
//! (a named `targetPort` is the backend's container port of that name and protocol; a backend
//! without it is not admitted). Every rather than any: kube-proxy may pick any backend for a
//! connection, so admitting the ClusterIP when only some backends are admitted would let the
//! client reach the others. The rule then also admits `P`'s protocol and port on that ClusterIP,
//! as extra compiled rules kept per group and Service (`… egress[i] via Service ns/name`;
//! omitted where the rule admits that address and port by itself), so a Service's change, or
//! its backends', re-judges that Service for the groups that can reach it, nothing else.
//!
//! Backends are the pods of the Service's namespace its selector matches that hold an address
//! and are not finished, as the EndpointSlice controller lists them (readiness aside: a pod
//! about to become ready must be admitted before it gets traffic). A Service without a selector
//! (EndpointSlices written by hand), headless and ExternalName Services resolve nothing.
//!
//! Which groups a change can affect: a rule with an ipBlock peer or no peers can admit the
//! Services of every namespace; a rule with pod peers only those of the namespaces its peers
//! select pods in. [`crate::index::EgressReach`] records that per group, and [`mark_reaching`]
//! marks (group, Service) pairs to judge again: a Service of a namespace with the groups
//! reaching it when the Service changes or a pod there that it selects (before or after)
//! changes, every Service of a namespace with the groups whose namespace selector starts or
//! stops matching it. A group whose own rules are redone (its spec, a group it names) judges
//! every Service it reaches again.

mod backends;
mod reach;
mod verdict;

pub(crate) use backends::find_backends;
pub(crate) use reach::{
    mark_reaching, reach, resolvable_in, selector_users, touched_by_pod, Pairs,
};
pub(crate) use verdict::{group_service_rules, service_rules, ServiceVerdict};
