use std::collections::HashMap;
use std::future::Future;

/// Loads many keys in one call: the function a [`Loader`](crate::Loader) batches into.
///
/// Return the values you found; a key missing from the map is "not found" (`Ok(None)` from
/// [`Loader::load`](crate::Loader::load), or an error under [`MissingKey::Error`](crate::MissingKey)).
/// Keys you return that nobody asked for are ignored. To fail single keys while the rest
/// succeed, make `V` a `Result` (see the crate docs); an `Err` from `load` fails the whole batch.
///
/// ```
/// use std::collections::HashMap;
/// use brisk_batch::BatchFn;
///
/// struct Authors; // holds a database pool in real code
///
/// impl BatchFn<u64, String> for Authors {
///     type Error = std::io::Error;
///
///     async fn load(&self, ids: &[u64]) -> Result<HashMap<u64, String>, Self::Error> {
///         // SELECT id, name FROM authors WHERE id = ANY($1)
///         Ok(ids.iter().map(|id| (*id, format!("author {id}"))).collect())
///     }
/// }
/// ```
pub trait BatchFn<K, V>: Send + Sync + 'static {
    /// The error of a failed batch. It reaches every waiter as the same `Arc<Error>`, so it
    /// need not be `Clone`.
    type Error: Send + Sync + 'static;

    /// Loads `keys` (distinct, at most `max_batch_size` of them).
    fn load(&self, keys: &[K]) -> impl Future<Output = Result<HashMap<K, V>, Self::Error>> + Send;
}
