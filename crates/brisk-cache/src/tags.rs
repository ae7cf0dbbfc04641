//! Tags and `clear`: the time each tag (and the whole cache) was last invalidated, stored in
//! Redis under the cache's prefix and known in process. An entry remembers its tags and when it
//! was made; a remote read of it that finds any of its tags (or the cache) invalidated at or
//! after that time is a miss. No entry is visited: invalidating a tag is one write.
//!
//! Known times come for free on a hit, so a hit stays one round trip; a time not known yet is
//! read once, all the entry's unknown tags in one `MGET` (they share a hash slot). Known times
//! are forgotten with every flush of the local tier, so with an invalidation connection a time
//! is trusted until another instance changes it; without one, for [`RECHECK`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::remote::Core;

/// Tags one entry may carry.
pub(crate) const MAX_TAGS: usize = 32;
/// The longest tag, in bytes.
pub(crate) const MAX_TAG_LEN: usize = 256;
/// Without an invalidation connection, a known time is read again after this long: another
/// instance's `invalidate_tag` or `clear` is seen here within it.
pub(crate) const RECHECK: Duration = Duration::from_secs(1);
/// Times known at most: past this many the table starts over (each is read again when needed),
/// so that a tag per user does not grow it without bound.
const MAX_KNOWN: usize = 65_536;
/// The name `clear` keeps its time under: no tag is empty.
pub(crate) const CLEAR: &str = "";

/// How far known times can be trusted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trust {
    /// Nothing to ask: the in-memory remote tier has no other instance.
    Always,
    /// Until forgotten: an invalidation connection hears every change.
    UntilFlushed,
    /// For a while: no one tells this instance.
    For(Duration),
    /// Not at all: the invalidation connection is not hearing.
    Never,
}

pub(crate) struct Tags {
    /// `{brisk:<name>:1:}`: a hash tag of its own, so every tag key of a cache shares a slot.
    prefix: Vec<u8>,
    known: Mutex<HashMap<Box<str>, Known, foldhash::fast::RandomState>>,
    /// Bumped by every change of `known` other than a read's: a read that began before one
    /// does not record what it read.
    generation: AtomicU64,
    /// The table is all there is (the in-memory remote tier): it is never started over.
    authoritative: bool,
}

#[derive(Debug, Clone, Copy)]
struct Known {
    /// Unix microseconds; 0 for never.
    at_us: u64,
    read: Instant,
}

impl Tags {
    /// The tags of the cache whose key prefix is `prefix` (`{brisk:<name>:1:`); `authoritative`
    /// when no remote store keeps their times (the in-memory remote tier).
    pub(crate) fn new(prefix: &[u8], authoritative: bool) -> Self {
        Self {
            prefix: [prefix, b"}"].concat(),
            known: Mutex::default(),
            generation: AtomicU64::new(0),
            authoritative,
        }
    }

    /// The Redis key of a tag's time (`{brisk:<name>:1:}tag:<tag>:at`), or of `clear`'s
    /// (`{brisk:<name>:1:}clear:at`). No entry key ends so (entries end with `}`, leases with
    /// `}:lease`).
    pub(crate) fn key(&self, name: &str) -> Vec<u8> {
        if name == CLEAR {
            [&self.prefix[..], b"clear:at"].concat()
        } else {
            [&self.prefix[..], b"tag:", name.as_bytes(), b":at"].concat()
        }
    }

    /// Refuses a tag no entry could carry.
    pub(crate) fn check(tag: &str) -> Result<(), Error> {
        if tag.is_empty() {
            return Err(Error::Tag("a tag must not be empty".into()));
        }
        if tag.len() > MAX_TAG_LEN {
            return Err(Error::Tag(
                format!("the tag is {} bytes, above {MAX_TAG_LEN}", tag.len()).into(),
            ));
        }
        Ok(())
    }

    /// Checks what a tag function gave one entry.
    pub(crate) fn check_all(tags: &[String]) -> Result<(), Error> {
        if tags.len() > MAX_TAGS {
            return Err(Error::Tag(
                format!("{} tags for one entry, above {MAX_TAGS}", tags.len()).into(),
            ));
        }
        tags.iter().try_for_each(|tag| Self::check(tag))
    }

    fn known(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Known, foldhash::fast::RandomState>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every known time: each is read again when next needed.
    pub(crate) fn forget_all(&self) {
        if self.authoritative {
            return;
        }
        let mut known = self.known();
        self.generation.fetch_add(1, Ordering::AcqRel);
        known.clear();
    }

    /// Records this instance's own invalidation of `name` at `at_us`.
    pub(crate) fn invalidated(&self, name: &str, at_us: u64) {
        let mut known = self.known();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let at_us = known.get(name).map_or(at_us, |k| k.at_us.max(at_us));
        if known.len() >= MAX_KNOWN && !self.authoritative {
            known.clear();
        }
        known.insert(
            name.into(),
            Known {
                at_us,
                read: Instant::now(),
            },
        );
    }

    /// Whether an entry made at `created_us` with `tags` was invalidated since, by one of its
    /// tags or by `clear`. Times not known (or no longer trusted) are read from `core` in one
    /// round trip; if that read fails, the entry counts as invalidated (a miss, which the next
    /// load overwrites).
    pub(crate) async fn outdated(
        &self,
        created_us: u64,
        tags: &[String],
        core: &Core,
        trust: Trust,
    ) -> bool {
        let now = Instant::now();
        let trusted = |known: &Known| match trust {
            Trust::Always | Trust::UntilFlushed => true,
            Trust::For(period) => now.saturating_duration_since(known.read) < period,
            Trust::Never => false,
        };
        let names = std::iter::once(CLEAR).chain(tags.iter().map(String::as_str));
        let generation = self.generation.load(Ordering::Acquire);
        let mut unknown = Vec::new();
        {
            let known = self.known();
            for name in names {
                match known.get(name) {
                    Some(k) if trusted(k) => {
                        if k.at_us >= created_us {
                            return true;
                        }
                    }
                    _ => unknown.push(name),
                }
            }
        }
        if unknown.is_empty() || trust == Trust::Always {
            return false;
        }
        let keys: Vec<Vec<u8>> = unknown.iter().map(|name| self.key(name)).collect();
        let Ok(times) = core.get_many(&keys).await else {
            return true;
        };
        let times: Vec<u64> = times
            .iter()
            .map(|time| {
                // Anything but our digits was not written by brisk: taken as never.
                time.as_deref()
                    .and_then(|t| std::str::from_utf8(t).ok()?.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        if trust != Trust::Never {
            let mut known = self.known();
            if self.generation.load(Ordering::Acquire) == generation {
                if known.len() + unknown.len() > MAX_KNOWN {
                    known.clear();
                }
                for (name, &at_us) in unknown.iter().zip(&times) {
                    known.insert((*name).into(), Known { at_us, read: now });
                }
            }
        }
        times.iter().any(|&at_us| at_us >= created_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_keys_share_a_slot_and_never_meet_entry_keys() {
        let tags = Tags::new(b"{brisk:users:1:", false);
        assert_eq!(tags.key("user:42"), b"{brisk:users:1:}tag:user:42:at");
        assert_eq!(tags.key(CLEAR), b"{brisk:users:1:}clear:at");
        assert!(Tags::check("").is_err());
        assert!(Tags::check(&"x".repeat(MAX_TAG_LEN)).is_ok());
        assert!(Tags::check(&"x".repeat(MAX_TAG_LEN + 1)).is_err());
        assert!(Tags::check_all(&vec!["t".to_owned(); MAX_TAGS]).is_ok());
        assert!(Tags::check_all(&vec!["t".to_owned(); MAX_TAGS + 1]).is_err());
    }
}
