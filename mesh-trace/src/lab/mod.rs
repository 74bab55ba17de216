//! The mesh lab: a faithful local Istio sidecar data path built from real
//! kernel parts (network namespaces, veth, a bridge, the istio-iptables nat
//! rules) and real processes (an Envoy-like sidecar and Bookinfo-shaped apps),
//! for tests, benchmarks and `mesh-trace demo`.
//!
//! - [`config`]: the topology and the sidecars' Envoy-shaped configuration;
//! - [`topology`]: bringing a lab up and down;
//! - [`proxy`], [`app`], [`loadgen`]: the processes that run in the pods;
//! - [`grpc`]: the gRPC service the apps serve and the load generator calls;
//! - [`haproxy`]: a third-party sidecar (Debian's HAProxy) in the same layout;
//! - [`churn`]: pod-like namespaces created and deleted under short connections;
//! - [`impair`]: packet loss and delay on a pod's interface, for TCP health;
//! - [`mtls`]: the mesh CA and the sidecars' certificates (mutual TLS);
//! - [`records`]: what they write down, the ground truth for tests;
//! - [`ioclock`]: when connections' reads and writes return, the records' times;
//! - [`txstamp`]: the kernel's transmit stamps of a socket's writes, for those times;
//! - [`shape`]: the lab's shape as flags, and a description of a running lab;
//! - [`summary`]: the demo's text summary, the lab's records next to the kernel's.
//!
//! Built only with the `lab` feature: the DaemonSet's agent carries none of it.
pub mod app;
pub mod churn;
pub mod config;
pub mod grpc;
pub mod haproxy;
pub mod http_client;
pub mod impair;
pub mod ioclock;
pub mod loadgen;
pub mod mtls;
pub mod pod_exec;
pub mod proxy;
pub mod records;
pub mod shape;
pub mod summary;
pub mod topology;
pub mod txstamp;
