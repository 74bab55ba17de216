//! Flow tagging in userspace: sockets reported by the kernel are joined
//! into legs (the two ends of one TCP connection), each classified by its
//! place in the sidecar data path and labelled with pods and services.
pub mod health;
pub mod kubernetes;
pub mod lab_topology;
pub mod legs;
pub mod metadata;
pub mod socket;
pub mod table;
#[cfg(test)]
pub mod test_events;
