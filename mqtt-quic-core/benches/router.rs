//! Routing cost: matching one publish against 1, 1k, 100k and 1M subscriptions (a mix of exact,
//! `+` and `#` filters over 10k devices), fan-out per delivered message, and the memory one
//! subscription takes (counted with an instrumented allocator, printed before the timings).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mqtt_proto::{QoS, SubscriptionOptions, TopicFilter, TopicName};
use mqtt_quic_core::broker::router::{Entry, Router};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::hint::black_box;
use std::time::Duration;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn entry() -> Entry {
    Entry { options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() }, subscription_id: None }
}

/// Subscription `i` of a mix: 70% exact, 20% with `+`, 10% with `#`, spread over 10k devices.
fn filter(i: u64) -> TopicFilter {
    let device = i % 10_000;
    let metric = (i / 10_000) % 100;
    let s = match i % 10 {
        0 => format!("site/{}/dev/{device}/#", device % 50),
        1 | 2 => format!("site/+/dev/{device}/m{metric}"),
        _ => format!("site/{}/dev/{device}/m{metric}", device % 50),
    };
    TopicFilter::new(s).unwrap()
}

fn build(n: u64) -> Router {
    let mut r = Router::new();
    for i in 0..n {
        r.subscribe(i, &filter(i), entry());
    }
    r
}

fn matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for n in [1u64, 1_000, 100_000, 1_000_000] {
        let region = Region::new(GLOBAL);
        let mut r = build(n);
        let stats = region.change();
        let net = stats.bytes_allocated.saturating_sub(stats.bytes_deallocated);
        eprintln!("router with {n} subscriptions: {} bytes, {} bytes per subscription", net, net / n as usize);
        let topic = TopicName::new("site/7/dev/7/m0").unwrap();
        let hits = r.route(&topic, None, |_| true).len();
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new(format!("match_{hits}_of"), n), &n, |b, _| {
            b.iter(|| black_box(r.route(black_box(&topic), None, |_| true)))
        });
    }
    g.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut r = Router::new();
    let f = TopicFilter::new("alerts/#").unwrap();
    for s in 0..1_000 {
        r.subscribe(s, &f, entry());
    }
    let topic = TopicName::new("alerts/fire").unwrap();
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("fan_out_1000", |b| b.iter(|| black_box(r.route(black_box(&topic), None, |_| true))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    targets = matching, fan_out
}
criterion_main!(benches);
