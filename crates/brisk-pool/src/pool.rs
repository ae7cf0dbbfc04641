//! The one trait brisk's pooling works through, for deadpool and bb8 alike.

use std::future::Future;

use crate::Lifecycle;

/// How full a pool is right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Status {
    /// Connections open (idle and in use).
    pub size: usize,
    /// Connections open and not checked out.
    pub idle: usize,
    /// The most connections the pool will open, when the backend says.
    pub max_size: Option<usize>,
    /// Callers waiting for a connection, when the backend says.
    pub waiting: Option<usize>,
}

impl Status {
    /// Connections checked out.
    #[must_use]
    pub fn in_use(&self) -> usize {
        self.size.saturating_sub(self.idle)
    }
}

/// Why a backend pool gave no connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum GetError<E> {
    /// Creating or recycling a connection failed.
    Backend(E),
    /// The backend's own wait timeout passed.
    Timeout,
    /// The pool was closed.
    Closed,
}

/// A connection pool: deadpool's and bb8's implement it, so `Instrumented` and the rest of
/// brisk work with the pool you already have.
pub trait Pool: Send + Sync + 'static {
    /// A checked-out connection; it goes back to the pool when dropped.
    type Connection: Send + 'static;
    /// The backend's error for creating or recycling a connection.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Checks out a connection. Callers bound the wait; see `Instrumented`.
    fn get(&self) -> impl Future<Output = Result<Self::Connection, GetError<Self::Error>>> + Send;

    /// How full the pool is.
    fn status(&self) -> Status;

    /// Closes the pool: idle connections are dropped and no new ones are made. The default does
    /// nothing (a bb8 pool closes when its last handle is dropped).
    fn close(&self) {}

    /// Closes the idle connections `lifecycle` no longer keeps; returns how many, or `None` when
    /// the backend reaps by itself (bb8, configured with [`Lifecycle::bb8`]).
    fn reap(&self, lifecycle: &Lifecycle) -> Option<usize> {
        let _ = lifecycle;
        None
    }
}

/// Any deadpool pool, including those that hand out a wrapper of their own (deadpool-redis's
/// `Connection`, for one).
#[cfg(feature = "deadpool")]
impl<M, W> Pool for deadpool::managed::Pool<M, W>
where
    M: deadpool::managed::Manager + 'static,
    M::Type: Send,
    M::Error: std::error::Error + Send + Sync + 'static,
    W: From<deadpool::managed::Object<M>> + Send + 'static,
{
    type Connection = W;
    type Error = M::Error;

    async fn get(&self) -> Result<Self::Connection, GetError<M::Error>> {
        use deadpool::managed::PoolError;
        deadpool::managed::Pool::get(self)
            .await
            .map_err(|err| match err {
                PoolError::Backend(err) => GetError::Backend(err),
                PoolError::Timeout(_) => GetError::Timeout,
                PoolError::Closed => GetError::Closed,
                PoolError::PostCreateHook(deadpool::managed::HookError::Backend(err)) => {
                    GetError::Backend(err)
                }
                // A hook's own message or a missing runtime: the pool cannot hand out connections.
                _ => GetError::Closed,
            })
    }

    fn close(&self) {
        deadpool::managed::Pool::close(self);
    }

    fn reap(&self, lifecycle: &Lifecycle) -> Option<usize> {
        let result =
            self.retain(|_, metrics| lifecycle.keeps(metrics.created, metrics.last_used()));
        Some(result.removed.len())
    }

    fn status(&self) -> Status {
        let status = deadpool::managed::Pool::status(self);
        Status {
            size: status.size,
            idle: status.available,
            max_size: Some(status.max_size),
            waiting: Some(status.waiting),
        }
    }
}

#[cfg(feature = "bb8")]
impl<M> Pool for bb8::Pool<M>
where
    M: bb8::ManageConnection,
    M::Error: std::error::Error + Send + Sync + 'static,
{
    type Connection = bb8::PooledConnection<'static, M>;
    type Error = M::Error;

    async fn get(&self) -> Result<Self::Connection, GetError<M::Error>> {
        self.get_owned().await.map_err(|err| match err {
            bb8::RunError::User(err) => GetError::Backend(err),
            bb8::RunError::TimedOut => GetError::Timeout,
        })
    }

    fn status(&self) -> Status {
        let state = self.state();
        Status {
            size: state.connections as usize,
            idle: state.idle_connections as usize,
            max_size: None,
            waiting: None,
        }
    }
}
