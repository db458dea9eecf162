//! Where jobs' results go besides tables: pprof profiles and Prometheus
//! metrics.

pub mod pprof;
pub mod prometheus;
