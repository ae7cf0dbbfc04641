//! Bytes in Redis that are not this cache's: a miss, counted, reloaded and overwritten.

mod common;

use brisk_cache::{Cache, Codec};
use brisk_metrics::catalog::CACHE_DECODE_FAILURES;
use brisk_metrics::testing::Capture;
use common::{Source, connect, eventually, raw_get, raw_set, redis};

const KEY: &str = "{brisk:t:1:i:1}";

async fn reload_over(server: &brisk_testkit::RedisServer, bad: &[u8], reason: &str) {
    raw_set(server, KEY, bad).await;
    let capture = Capture::new();
    let redis = connect(server).await;
    let cache: Cache<u64, String> =
        capture.run(|| Cache::builder("t").redis(redis).build().unwrap());
    let source = Source::default();
    let value = cache.get_or_load(&1, source.load("fresh")).await.unwrap();
    assert_eq!(value.as_deref(), Some("fresh"), "{reason}");
    assert_eq!(source.count(), 1, "{reason}: reloaded");
    let labels = [("cache", "t"), ("reason", reason)];
    assert_eq!(
        capture.counter(CACHE_DECODE_FAILURES.name, &labels),
        1,
        "{reason}: counted"
    );
    eventually("the bad bytes were overwritten", async || {
        raw_get(server, KEY)
            .await
            .is_some_and(|bytes| bytes != bad && bytes.starts_with(b"bk"))
    })
    .await;
    assert_eq!(
        cache.get(&1).await.unwrap().as_deref(),
        Some("fresh"),
        "{reason}"
    );
}

/// A value this cache wrote itself, to damage.
async fn good_bytes(server: &brisk_testkit::RedisServer) -> Vec<u8> {
    let cache: Cache<u64, String> = Cache::builder("t")
        .redis(connect(server).await)
        .build()
        .unwrap();
    cache.set(&1, "good".into()).await.unwrap();
    raw_get(server, KEY).await.unwrap()
}

#[tokio::test]
async fn garbage_is_a_miss() {
    let server = redis();
    reload_over(&server, b"\x00\xffnot an envelope", "foreign").await;
    reload_over(&server, b"", "foreign").await;
}

#[tokio::test]
async fn a_truncated_envelope_is_a_miss() {
    let server = redis();
    let good = good_bytes(&server).await;
    reload_over(&server, &good[..good.len() - 1], "truncated").await;
    reload_over(&server, &good[..10], "truncated").await;
}

#[tokio::test]
async fn another_format_version_is_a_miss() {
    let server = redis();
    let mut bytes = good_bytes(&server).await;
    bytes[2] = 200;
    reload_over(&server, &bytes, "version").await;
}

#[tokio::test]
async fn a_garbled_payload_is_a_miss() {
    let server = redis();
    let mut bytes = good_bytes(&server).await;
    bytes[37] = 0xc1; // the first payload byte: a marker MessagePack never uses
    reload_over(&server, &bytes, "payload").await;
}

#[tokio::test]
async fn another_types_value_is_a_miss() {
    let server = redis();
    let numbers: Cache<u64, u32> = Cache::builder("t")
        .redis(connect(&server).await)
        .build()
        .unwrap();
    numbers.set(&1, 7).await.unwrap();
    let bytes = raw_get(&server, KEY).await.unwrap();
    reload_over(&server, &bytes, "type").await;
}

#[tokio::test]
async fn another_codecs_value_is_a_miss() {
    let server = redis();
    let json: Cache<u64, String> = Cache::builder("t")
        .codec(Codec::Json)
        .redis(connect(&server).await)
        .build()
        .unwrap();
    json.set(&1, "as json".into()).await.unwrap();
    let bytes = raw_get(&server, KEY).await.unwrap();
    reload_over(&server, &bytes, "codec").await;
}

/// What serde attributes make of a type: fields skipped when empty, flattened, untagged enums.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Attributed {
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    nickname: Option<String>,
    #[serde(flatten)]
    extra: Extra,
    shape: Shape,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Extra {
    score: i32,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Shape {
    Circle { radius: f64 },
    Named(String),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Skipping {
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    nickname: Option<String>,
}

#[tokio::test]
async fn self_describing_codecs_round_trip_serde_attributes() {
    let value = Attributed {
        id: 1,
        nickname: None,
        extra: Extra { score: -3 },
        shape: Shape::Named("sq".into()),
    };
    for codec in [Codec::MessagePack, Codec::Json] {
        let cache: Cache<u64, Attributed> = Cache::builder("t").codec(codec).build().unwrap();
        cache.set(&1, value.clone()).await.unwrap();
        assert_eq!(
            cache.get(&1).await.unwrap(),
            Some(value.clone()),
            "{codec:?}"
        );
    }
}

#[tokio::test]
async fn postcard_cannot_carry_such_types_and_says_so_or_misses() {
    let capture = Capture::new();
    let skipping: Cache<u64, Skipping> =
        capture.run(|| Cache::builder("t").codec(Codec::Postcard).build().unwrap());
    skipping
        .set(
            &1,
            Skipping {
                id: 1,
                nickname: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        skipping.get(&1).await.unwrap(),
        None,
        "written, never read back: a miss"
    );
    let failures = capture.counter(
        CACHE_DECODE_FAILURES.name,
        &[("cache", "t"), ("reason", "payload")],
    );
    assert_eq!(failures, 1, "counted");
    let flattened: Cache<u64, Attributed> =
        Cache::builder("u").codec(Codec::Postcard).build().unwrap();
    let value = Attributed {
        id: 1,
        nickname: None,
        extra: Extra { score: -3 },
        shape: Shape::Named("sq".into()),
    };
    let err = flattened.set(&1, value.clone()).await.unwrap_err();
    assert!(matches!(err, brisk_cache::Error::Encode(_)), "{err}");
    // A load still answers; the value stays out of the remote tier.
    let loaded = flattened
        .get_or_load(&2, async move { Ok::<_, std::io::Error>(Some(value)) })
        .await
        .unwrap();
    assert!(loaded.is_some());
}

#[tokio::test]
async fn a_field_added_with_a_default_reads_old_values() {
    #[derive(serde::Serialize, serde::Deserialize, Clone)]
    struct V1 {
        id: u64,
    }
    #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
    struct V2 {
        id: u64,
        #[serde(default)]
        email: String,
    }
    let server = redis();
    for codec in [Codec::MessagePack, Codec::Json] {
        let redis = connect(&server).await;
        let name = format!("evolve-{}", codec as u8);
        // A type's fingerprint is its Rust name: a renamed type is another type. Same name here.
        let old: Cache<u64, V1> = Cache::builder(&name)
            .codec(codec)
            .redis(redis.clone())
            .build()
            .unwrap();
        old.set(&1, V1 { id: 1 }).await.unwrap();
        let bytes = raw_get(&server, &format!("{{brisk:{name}:1:i:1}}"))
            .await
            .unwrap();
        let new: Cache<u64, V2> = Cache::builder(&name)
            .codec(codec)
            .redis(redis)
            .build()
            .unwrap();
        let mut patched = bytes.clone();
        // Stand in for "the same type, one field later": give the old bytes the new type's print.
        let new_print = brisk_cache_fingerprint::<V2>();
        patched[5..13].copy_from_slice(&new_print.to_le_bytes());
        raw_set(&server, &format!("{{brisk:{name}:1:i:1}}"), &patched).await;
        assert_eq!(
            new.get(&1).await.unwrap(),
            Some(V2 {
                id: 1,
                email: String::new()
            }),
            "{codec:?}"
        );
    }
}

/// The envelope's type fingerprint: FNV-1a of the type's name (see the envelope's docs).
fn brisk_cache_fingerprint<T>() -> u64 {
    std::any::type_name::<T>()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

#[tokio::test]
async fn every_codec_round_trips() {
    let server = redis();
    for codec in [Codec::Json, Codec::Postcard, Codec::MessagePack] {
        let cache: Cache<u64, Vec<(String, Option<u32>)>> =
            Cache::builder(&format!("codec-{}", codec as u8))
                .codec(codec)
                .redis(connect(&server).await)
                .build()
                .unwrap();
        let value = vec![("a".to_owned(), Some(1)), ("b".to_owned(), None)];
        cache.set(&1, value.clone()).await.unwrap();
        assert_eq!(cache.get(&1).await.unwrap(), Some(value), "{codec:?}");
    }
}

#[tokio::test]
async fn compressed_values_round_trip_and_shrink() {
    let server = redis();
    let cache: Cache<u64, String> = Cache::builder("t")
        .compress_above(256)
        .redis(connect(&server).await)
        .build()
        .unwrap();
    let value = "brisk ".repeat(2_000);
    cache.set(&1, value.clone()).await.unwrap();
    let stored = raw_get(&server, KEY).await.unwrap();
    assert!(
        stored.len() < value.len() / 4,
        "{} bytes stored",
        stored.len()
    );
    assert_eq!(cache.get(&1).await.unwrap(), Some(value));
}

#[tokio::test]
async fn an_oversize_value_stays_out_of_redis_and_the_call_succeeds() {
    let server = redis();
    let capture = Capture::new();
    let redis = connect(&server).await;
    let cache: Cache<u64, String> = capture.run(|| {
        Cache::builder("t")
            .max_value_size(1_000)
            .local(brisk_cache::LocalTier::entries(10))
            .redis(redis)
            .build()
            .unwrap()
    });
    cache.set(&1, "small".into()).await.unwrap();
    assert!(raw_get(&server, KEY).await.is_some());
    cache.set(&1, "x".repeat(2_000)).await.unwrap();
    assert_eq!(
        raw_get(&server, KEY).await,
        None,
        "the old value was removed, the new one not stored"
    );
    assert_eq!(
        capture.counter(
            brisk_metrics::catalog::CACHE_OVERSIZE.name,
            &[("cache", "t")]
        ),
        1
    );
    assert_eq!(
        cache.get(&1).await.unwrap().map(|v| v.len()),
        Some(2_000),
        "the local tier keeps it"
    );
    let loaded = cache
        .get_or_load(&2, async {
            Ok::<_, std::io::Error>(Some("y".repeat(5_000)))
        })
        .await;
    assert_eq!(loaded.unwrap().map(|v| v.len()), Some(5_000));
    assert_eq!(
        capture.counter(
            brisk_metrics::catalog::CACHE_OVERSIZE.name,
            &[("cache", "t")]
        ),
        2
    );
}
