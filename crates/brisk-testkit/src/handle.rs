//! What every server of the kit shares: it is either ours (a process we can signal) or someone
//! else's (a URL from the environment, which refuses fault injection).

use crate::process::Process;
use crate::{Error, Result};

#[derive(Debug)]
pub(crate) enum Handle<P> {
    External(String),
    Private(P),
}

/// A server this kit started.
pub(crate) trait Owned {
    fn process(&self) -> &Process;
    fn process_mut(&mut self) -> &mut Process;
}

impl<P: Owned> Handle<P> {
    /// Our own server, or [`Error::External`] naming what was asked of someone else's.
    pub(crate) fn private(&mut self, action: &'static str) -> Result<&mut P> {
        match self {
            Self::Private(private) => Ok(private),
            Self::External(url) => Err(Error::External {
                action,
                url: url.clone(),
            }),
        }
    }

    pub(crate) fn url(&self, private: impl FnOnce(&P) -> String) -> String {
        match self {
            Self::External(url) => url.clone(),
            Self::Private(p) => private(p),
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Self::Private(private) => private.process().pid(),
            Self::External(_) => None,
        }
    }

    pub(crate) fn is_private(&self) -> bool {
        matches!(self, Self::Private(_))
    }

    pub(crate) fn kill(&mut self) -> Result<()> {
        self.private("kill")?.process_mut().kill()
    }

    pub(crate) fn pause(&mut self) -> Result<()> {
        self.private("pause")?.process_mut().pause()
    }

    pub(crate) fn resume(&mut self) -> Result<()> {
        self.private("resume")?.process_mut().resume()
    }
}
