//! Zipf-distributed keys, seeded: a few keys are hot, most are cold, as in real traffic.

/// `count` keys in `0..n`, key `k` drawn with probability proportional to `1 / (k + 1)^s`.
pub(crate) fn zipf_keys(n: u64, s: f64, count: usize, seed: u64) -> Vec<u64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in weights {
        acc += w / total;
        cdf.push(acc);
    }
    let mut state = seed | 1;
    (0..count)
        .map(|_| {
            // xorshift64: seeded, reproducible, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1_u64 << 53) as f64;
            cdf.partition_point(|p| *p < u).min(cdf.len() - 1) as u64
        })
        .collect()
}
