/// Everything that can go wrong in brisk-metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder was given a value it cannot work with.
    #[error("invalid metrics configuration: {0}")]
    InvalidConfig(&'static str),
    /// A global recorder was installed before; only one can be, per process.
    #[error(
        "a metrics recorder is already installed in this process; install the exporter once, at startup"
    )]
    RecorderAlreadyInstalled,
    /// The Prometheus exporter could not be built.
    #[cfg(feature = "prometheus")]
    #[error("the Prometheus exporter could not be built")]
    Prometheus(#[source] metrics_exporter_prometheus::BuildError),
}
