//! The kube-proxy control plane shared by every backend.
//!
//! Data flows one way: [`watch`] feeds Kubernetes objects into the [`tracker::ChangeTracker`], which
//! parses them once into the [`model`], selects endpoints ([`selection`]) and hands a
//! [`model::Snapshot`] plus the [`model::Changes`] since the last sync to the [`runner::SyncRunner`],
//! which calls a [`backend::Backend`]. Backends never see Kubernetes objects.

pub mod backend;
pub mod events;
pub mod gofmt;
pub mod healthcheck;
pub mod metrics;
pub mod model;
pub mod observe;
pub mod parse;
pub mod record;
pub mod runner;
pub mod selection;
pub mod tracker;
pub mod watch;
