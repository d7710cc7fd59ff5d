pub mod config;
pub mod forge;
pub mod gitops;
pub mod metrics;
pub mod run;
pub mod server;
pub mod status;
pub mod webhook;
