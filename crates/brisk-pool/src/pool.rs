//! The one trait brisk's pooling works through, for deadpool and bb8 alike.

use std::future::Future;

use crate::{IdleSince, Lifecycle};

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

    /// Takes `connection` out of the pool for good and closes it, instead of returning it to be
    /// handed out again: for a connection whose last operation was cut off, and may still be
    /// running on the server. The default drops it, which returns it to the pool.
    fn discard(&self, connection: Self::Connection) {
        drop(connection);
    }

    /// Opens one connection and adds it to the pool as idle, checking none out: how
    /// [`Instrumented::warm_up`](crate::Instrumented::warm_up) opens what is missing. `None`
    /// when the backend cannot (the default, and deadpool's): the warm-up then checks out the
    /// idle connections too, so that the pool opens new ones for the rest, and gives each back
    /// as soon as it has it.
    fn open_idle(&self) -> Option<impl Future<Output = Result<(), GetError<Self::Error>>> + Send> {
        None::<std::future::Ready<Result<(), GetError<Self::Error>>>>
    }

    /// Closes the idle connections `lifecycle` no longer keeps; returns how many, or `None` when
    /// the backend reaps by itself (bb8, configured with [`Lifecycle::bb8`]). `idle` tells how
    /// long each has been idle across rounds; the caller keeps it from one round to the next.
    fn reap(&self, lifecycle: &Lifecycle, idle: &mut IdleSince) -> Option<usize> {
        let _ = (lifecycle, idle);
        None
    }
}

/// Any deadpool pool, including those typed with a wrapper of their own (deadpool-redis's
/// `Connection`, for one).
///
/// The connection handed out is deadpool's `Object<M>` whatever the wrapper `W`: an `Object` is
/// what can be taken out of the pool for good ([`Pool::discard`]); a wrapper cannot be turned
/// back into one. It dereferences to the manager's connection, as the wrapper does.
#[cfg(feature = "deadpool")]
impl<M, W> Pool for deadpool::managed::Pool<M, W>
where
    M: deadpool::managed::Manager + 'static,
    M::Type: Send,
    M::Error: std::error::Error + Send + Sync + 'static,
    W: From<deadpool::managed::Object<M>> + Send + 'static,
{
    type Connection = deadpool::managed::Object<M>;
    type Error = M::Error;

    async fn get(&self) -> Result<Self::Connection, GetError<M::Error>> {
        use deadpool::managed::{Object, PoolError};
        use std::any::Any;
        // The usual pool hands out `Object`s already (`W` is `Object<M>`, a comparison of
        // constants): take it as it is. A wrapper is avoided by checking out of the same pool
        // typed without it, which costs an `Arc` upgrade per checkout.
        let result = if std::any::TypeId::of::<W>() == std::any::TypeId::of::<Object<M>>() {
            deadpool::managed::Pool::get(self).await.map(|wrapped| {
                let mut wrapped = Some(wrapped);
                (&mut wrapped as &mut dyn Any)
                    .downcast_mut::<Option<Object<M>>>()
                    .and_then(Option::take)
                    .expect("W is Object<M>: the type ids are equal")
            })
        } else {
            match self.weak().upgrade() {
                Some(objects) => objects.get().await,
                None => Err(PoolError::Closed),
            }
        };
        result.map_err(|err| match err {
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

    fn discard(&self, connection: Self::Connection) {
        drop(deadpool::managed::Object::take(connection));
    }

    fn reap(&self, lifecycle: &Lifecycle, idle: &mut IdleSince) -> Option<usize> {
        // deadpool's `last_used` is the time since the last checkout, in use or not: idle time
        // is counted from the first round that saw the connection back instead.
        let now = std::time::Instant::now();
        let result = self.retain(|_, metrics| {
            let idle_for = idle.idle_for(metrics.created, metrics.recycle_count, now);
            lifecycle.keeps(metrics.created, idle_for)
        });
        idle.end_round();
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

    /// bb8 waits for any connection rather than opening one per checkout: a connection is opened
    /// (its `connection_customizer` run) and added to the pool. One the pool has no room for
    /// any more, or that is already broken, is closed.
    fn open_idle(&self) -> Option<impl Future<Output = Result<(), GetError<M::Error>>> + Send> {
        Some(async move {
            let connection = self
                .dedicated_connection()
                .await
                .map_err(GetError::Backend)?;
            // Full meanwhile (a caller's checkout opened one), or broken: closed.
            drop(self.add(connection));
            Ok(())
        })
    }

    /// bb8 takes a connection out only when its manager's `has_broken` says it is broken: wrap
    /// the manager in [`Measured`](crate::Measured), which says so for a connection being
    /// discarded. Over another manager the connection goes back to the pool.
    fn discard(&self, connection: Self::Connection) {
        crate::measured::discarding(|| drop(connection));
    }

    fn status(&self) -> Status {
        let state = self.state();
        Status {
            size: state.connections as usize,
            idle: state.idle_connections as usize,
            max_size: Some(self.config().max_size as usize),
            waiting: None,
        }
    }
}
