//! A loader built before the application installs its recorder still reports (issue 8, item 9).
//! A test binary of its own: it installs the process's global recorder.

mod common;

use brisk_batch::Loader;
use brisk_metrics::catalog::{BATCH_BATCHES, BATCH_SIZE};
use brisk_metrics::testing::Capture;
use common::Echo;

#[tokio::test]
async fn a_loader_built_before_the_recorder_is_installed_reports_to_it() {
    let (echo, _) = Echo::new();
    let loader = Loader::builder(echo).name("early").build().unwrap();
    assert_eq!(loader.load(1).await.unwrap().as_deref(), Some("1"));
    let capture: &'static Capture = Box::leak(Box::new(Capture::new()));
    metrics::set_global_recorder(capture).expect("the only recorder of this binary");
    let (a, b) = tokio::join!(loader.load(2), loader.load(3));
    assert!(a.is_ok() && b.is_ok());
    let labels = [("loader", "early")];
    assert_eq!(capture.counter(BATCH_BATCHES.name, &labels), 1);
    assert_eq!(capture.histogram(BATCH_SIZE.name, &labels), vec![2.0]);
}
