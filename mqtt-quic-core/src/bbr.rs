//! A BBR-style congestion controller without randomness, the default for our connections.
//!
//! Loss-based controllers (NewReno, CUBIC) read every lost packet as congestion and shrink the
//! window. On a cellular or Wi-Fi link most losses are random, not queue overflow, and at 10% loss
//! CUBIC spends its time near the minimum window: an MQTT publisher offering 2000 msg/s over a
//! 30 ms path falls behind (`tests/tests/lossy_grid.rs`). BBR instead models the path: the
//! highest delivery rate seen over the last rounds and the lowest round-trip time over the last
//! seconds, and keeps about twice their product in flight, whatever the loss.
//!
//! quinn-proto ships a BBR, but it draws the start of its gain cycle from the operating system's
//! random generator, so a machine using it no longer replays a run from the same seed. This one
//! has no randomness at all. It is also shaped for how quinn uses a controller: quinn paces
//! packets from the window and the smoothed RTT, not from a controller's pacing rate, so the
//! window is the only lever and BBR's pacing-gain cycle has nothing to act on. In its place the
//! window keeps a headroom of twice the estimated bandwidth-delay product, which lets the
//! bandwidth filter see a higher delivery rate as soon as the application offers more.
//!
//! The modes, after BBR (draft-cardwell-iccrg-bbr-congestion-control):
//! - *Startup*: the window grows by every acknowledged byte (doubling per round) until three
//!   rounds in a row raise the bandwidth estimate by less than a quarter;
//! - *Drain*: the window is one bandwidth-delay product until the queue built in startup is gone;
//! - *Cruise* (BBR's ProbeBW): window = 2 x (bandwidth x min RTT + the burst of acknowledgements
//!   the path aggregates);
//! - *ProbeRtt*: when the min RTT has not been seen again for 10 s, half a bandwidth-delay product
//!   for 200 ms and a round, so a queue of our own making does not inflate the estimate forever.
//!
//! Loss leaves the window alone, with two exceptions. Persistent congestion (RFC 9002, 7.6)
//! collapses it to the minimum; the window then regrows by acknowledged bytes to the model's
//! target. And a round that loses at least 30% of its bytes (with 16 packets or more in it, so
//! that random loss of a few percent never qualifies) halves the window and caps it, the cap
//! growing back by an eighth per round that is not itself heavy-loss: that is a receiver's socket buffer or a shallow
//! queue dropping the tail of every burst, which the model (delivery rate and RTT) cannot see.
//! Without it a QoS 0 subscriber on an overloaded machine received nothing at all (every burst,
//! retransmitted at the same size, overflowed again); see BENCHMARKS.md.

use quinn_proto::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;
use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds the bandwidth estimate remembers its maximum over.
const BW_ROUNDS: u64 = 10;
/// How long a min RTT sample stays valid before a ProbeRtt refreshes it.
const MIN_RTT_LIFETIME: Duration = Duration::from_secs(10);
/// How long ProbeRtt holds the window down (at least one round too).
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// Startup's window target: 2/ln(2), the gain that doubles the delivery rate each round.
const STARTUP_GAIN: f64 = 2.885;
/// Cruise window as a multiple of the bandwidth-delay product.
const CRUISE_GAIN: f64 = 2.0;
/// A bandwidth estimate that grows less than this per round means the pipe is full.
const FULL_BW_GROWTH: f64 = 1.25;
/// Rounds without that growth before startup ends.
const FULL_BW_ROUNDS: u32 = 3;
/// Smallest window, in packets (BBR's minimum: enough for delayed ACKs to keep flowing).
const MIN_WINDOW_PACKETS: u64 = 4;
/// A round that loses at least this share of its bytes (and carried enough packets to judge)
/// is not random loss but a queue or a receiver overflowing: the window is halved and capped.
const HEAVY_LOSS: f64 = 0.3;
/// Fewest packets a round must carry before its loss share counts as heavy.
const HEAVY_LOSS_MIN_PACKETS: u64 = 16;
/// How much the cap grows back per round that is not heavy-loss.
const CAP_REGROWTH: f64 = 1.125;

/// Builds [`Bbr`] controllers; pass it to quinn's `TransportConfig::congestion_controller_factory`
/// (our [`crate::config::Congestion::Bbr`] does).
#[derive(Debug, Clone, Default)]
pub struct BbrConfig {
    /// First window in bytes; `None` is RFC 9002's `min(10 x MTU, max(14720, 2 x MTU))`.
    pub initial_window: Option<u64>,
}

impl ControllerFactory for BbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bbr::new(self.initial_window, now, current_mtu))
    }
}

/// What the controller is doing; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Finding the path's bandwidth.
    Startup,
    /// Emptying the queue startup built.
    Drain,
    /// Keeping twice the bandwidth-delay product in flight.
    Cruise,
    /// Holding the window down to measure the path's RTT without our own queue.
    ProbeRtt,
}

/// A maximum over the last [`BW_ROUNDS`] rounds: one entry per round, at most eleven.
#[derive(Debug, Clone, Default)]
struct RoundMax {
    entries: VecDeque<(u64, u64)>,
}

impl RoundMax {
    fn update(&mut self, round: u64, value: u64) {
        while self.entries.front().is_some_and(|(r, _)| r + BW_ROUNDS <= round) {
            self.entries.pop_front();
        }
        match self.entries.back_mut() {
            Some((r, v)) if *r == round => *v = (*v).max(value),
            _ => self.entries.push_back((round, value)),
        }
    }

    fn get(&self) -> u64 {
        self.entries.iter().map(|(_, v)| *v).max().unwrap_or(0)
    }
}

/// The controller. Deterministic: its outputs depend only on the events quinn reports.
#[derive(Debug, Clone)]
pub struct Bbr {
    mode: Mode,
    mtu: u64,
    window: u64,
    initial_window: u64,
    /// Delivery rate, bytes per second: maximum over the last rounds.
    bw: RoundMax,
    /// Acknowledged bytes beyond what `bw` explains (ACK aggregation), over the last rounds.
    extra_acked: RoundMax,
    min_rtt: Option<Duration>,
    min_rtt_at: Instant,
    // Rounds: a round ends when a packet sent after the previous round ended is acknowledged.
    round: u64,
    round_end_packet: Option<u64>,
    round_start: Instant,
    round_acked: u64,
    last_sent_packet: Option<u64>,
    // Acknowledgements of the batch quinn is reporting (between two on_end_acks).
    batch_acked: u64,
    // ACK aggregation epoch.
    epoch_start: Instant,
    epoch_acked: u64,
    // Startup's full-pipe detection.
    full_bw: u64,
    full_bw_rounds: u32,
    filled_pipe: bool,
    // ProbeRtt: when it may end (set once the window has come down), and the round it began.
    probe_rtt_until: Option<Instant>,
    probe_rtt_round: u64,
    /// The min RTT expired: enter ProbeRtt at the end of this batch.
    probe_rtt_pending: bool,
    /// Bytes declared lost in this round.
    round_lost: u64,
    /// An upper bound on the window after heavy loss (BBRv2's `inflight_hi`, simplified): it
    /// grows back by an eighth per loss-free round and goes away once above the model's target.
    cap: Option<u64>,
}

impl Bbr {
    /// A controller for a new path.
    pub fn new(initial_window: Option<u64>, now: Instant, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        let initial_window = initial_window.unwrap_or((10 * mtu).min(14720u64.max(2 * mtu)));
        Bbr {
            mode: Mode::Startup,
            mtu,
            window: initial_window,
            initial_window,
            bw: RoundMax::default(),
            extra_acked: RoundMax::default(),
            min_rtt: None,
            min_rtt_at: now,
            round: 0,
            round_end_packet: None,
            round_start: now,
            round_acked: 0,
            last_sent_packet: None,
            batch_acked: 0,
            epoch_start: now,
            epoch_acked: 0,
            full_bw: 0,
            full_bw_rounds: 0,
            filled_pipe: false,
            probe_rtt_until: None,
            probe_rtt_round: 0,
            probe_rtt_pending: false,
            round_lost: 0,
            cap: None,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Estimated bottleneck bandwidth, bytes per second (0 before the first round ends).
    pub fn bandwidth(&self) -> u64 {
        self.bw.get()
    }

    /// The lowest recent round-trip time, if any was measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu
    }

    /// Bandwidth x min RTT, in bytes; `None` until both are known.
    fn bdp(&self) -> Option<u64> {
        let bw = self.bw.get();
        let rtt = self.min_rtt?;
        (bw > 0).then_some((bw as f64 * rtt.as_secs_f64()) as u64)
    }

    /// Ends the round if the acknowledged packet was sent after the round began.
    fn end_round(&mut self, now: Instant, app_limited: bool, largest_acked: Option<u64>) -> bool {
        let ended = match (self.round_end_packet, largest_acked) {
            (Some(end), Some(acked)) => acked >= end,
            (None, Some(_)) => true,
            _ => false,
        };
        if !ended {
            return false;
        }
        let elapsed = now.saturating_duration_since(self.round_start);
        if !elapsed.is_zero() && self.round_acked > 0 {
            let sample = (self.round_acked as f64 / elapsed.as_secs_f64()) as u64;
            // An application-limited round says nothing about the path unless it beats the estimate.
            if !app_limited || sample > self.bw.get() {
                self.bw.update(self.round, sample);
            }
        }
        self.judge_loss();
        self.round += 1;
        self.round_start = now;
        self.round_acked = 0;
        self.round_lost = 0;
        self.round_end_packet = self.last_sent_packet.map(|p| p + 1);
        true
    }

    /// At the end of a round: heavy loss halves and caps the window; a loss-free round lets the
    /// cap grow back. Random loss (a few percent, spread over rounds) never reaches the
    /// threshold, so the path model alone keeps deciding there; a burst that overflows a
    /// receiver's socket buffer or a shallow queue loses most of itself, round after round,
    /// which without this the model would never see (it only reads delivery rate and RTT).
    fn judge_loss(&mut self) {
        let total = self.round_acked + self.round_lost;
        let heavy = total >= HEAVY_LOSS_MIN_PACKETS * self.mtu && self.round_lost as f64 >= total as f64 * HEAVY_LOSS;
        if heavy {
            let cap = (self.window / 2).max(self.min_window());
            self.cap = Some(cap);
            self.window = self.window.min(cap);
        } else if let Some(cap) = self.cap {
            // Any round below the threshold lets it grow back: light random loss must not
            // hold a cap that one burst of loss set.
            self.cap = Some(((cap as f64 * CAP_REGROWTH) as u64).saturating_add(self.mtu));
        }
    }

    fn check_full_pipe(&mut self, app_limited: bool) {
        if self.filled_pipe || app_limited {
            return;
        }
        let bw = self.bw.get();
        if bw as f64 >= self.full_bw as f64 * FULL_BW_GROWTH {
            self.full_bw = bw;
            self.full_bw_rounds = 0;
            return;
        }
        self.full_bw_rounds += 1;
        if self.full_bw_rounds >= FULL_BW_ROUNDS {
            self.filled_pipe = true;
        }
    }

    fn update_ack_aggregation(&mut self, now: Instant, acked: u64) {
        let bw = self.bw.get();
        if bw == 0 {
            return;
        }
        let expected = (bw as f64 * now.saturating_duration_since(self.epoch_start).as_secs_f64()) as u64;
        // Acknowledgements at or below the modelled rate start a new epoch.
        if self.epoch_acked <= expected {
            self.epoch_start = now;
            self.epoch_acked = 0;
        }
        self.epoch_acked += acked;
        let extra = self.epoch_acked.saturating_sub(expected).min(self.window);
        self.extra_acked.update(self.round, extra);
    }

    fn update_mode(&mut self, now: Instant, in_flight: u64, round_ended: bool) {
        if self.mode == Mode::Startup && self.filled_pipe {
            self.mode = Mode::Drain;
        }
        if self.mode == Mode::Drain && self.bdp().is_none_or(|bdp| in_flight <= bdp) {
            self.mode = Mode::Cruise;
        }
        if self.mode != Mode::ProbeRtt && std::mem::take(&mut self.probe_rtt_pending) {
            self.mode = Mode::ProbeRtt;
            self.probe_rtt_until = None;
        }
        if self.mode == Mode::ProbeRtt {
            let floor = self.probe_rtt_window();
            match self.probe_rtt_until {
                None if in_flight <= floor => {
                    self.probe_rtt_until = Some(now + PROBE_RTT_TIME);
                    self.probe_rtt_round = self.round;
                }
                Some(until) if now >= until && round_ended && self.round > self.probe_rtt_round => {
                    // The lowest sample of the probe (kept by on_ack) is the new min RTT.
                    self.probe_rtt_until = None;
                    self.mode = if self.filled_pipe { Mode::Cruise } else { Mode::Startup };
                }
                _ => {}
            }
        }
    }

    /// One packet sent at `sent` and `bytes` long was acknowledged.
    fn acked(&mut self, now: Instant, sent: Instant, bytes: u64) {
        self.round_acked += bytes;
        self.batch_acked += bytes;
        // The sample includes the peer's ACK delay; the minimum over seconds of samples does not
        // care, and it avoids depending on quinn's smoothing.
        let sample = now.saturating_duration_since(sent);
        let expired = now.saturating_duration_since(self.min_rtt_at) > MIN_RTT_LIFETIME;
        if expired && self.mode != Mode::ProbeRtt {
            // Take the sample for now; the probe that follows looks for a lower one.
            self.probe_rtt_pending = true;
            self.min_rtt = Some(sample);
            self.min_rtt_at = now;
        } else if self.min_rtt.is_none_or(|m| sample <= m) {
            self.min_rtt = Some(sample);
            self.min_rtt_at = now;
        }
    }

    fn probe_rtt_window(&self) -> u64 {
        self.bdp().map_or(0, |bdp| bdp / 2).max(self.min_window())
    }

    fn update_window(&mut self, acked: u64) {
        let min = self.min_window();
        let gain = match self.mode {
            Mode::ProbeRtt => {
                self.window = self.window.min(self.probe_rtt_window());
                return;
            }
            Mode::Startup => STARTUP_GAIN,
            Mode::Drain => 1.0,
            Mode::Cruise => CRUISE_GAIN,
        };
        let Some(bdp) = self.bdp() else {
            // No model yet: grow like slow start.
            self.window += acked;
            return;
        };
        // The gain applies to the ACK-aggregation allowance too. Where acknowledgements come in
        // bursts a round apart (a busy receiver reading its socket once per loop turn, Wi-Fi
        // aggregation), the min RTT is far below the round trip the data sees and the allowance
        // is most of the window: without the gain the window has no room to grow past it (a
        // QoS 0 fan-in to a busy receiver on loopback delivered a third to a half of what
        // CUBIC did; with the gain, 0.55-0.86x). With it the window can settle at twice what a
        // round delivers, as on any path.
        let target = (((bdp + self.extra_acked.get()) as f64 * gain) as u64).max(min);
        if self.filled_pipe {
            self.window = (self.window + acked).min(target);
        } else if self.window < target || self.window < self.initial_window {
            self.window += acked;
        }
        if let Some(cap) = self.cap {
            if cap >= target {
                self.cap = None;
            } else {
                self.window = self.window.min(cap);
            }
        }
        self.window = self.window.max(min);
    }
}

impl Controller for Bbr {
    fn on_sent(&mut self, _now: Instant, _bytes: u64, last_packet_number: u64) {
        self.last_sent_packet = Some(last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, _app_limited: bool, _rtt: &RttEstimator) {
        self.acked(now, sent, bytes);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_acked: Option<u64>) {
        let acked = std::mem::take(&mut self.batch_acked);
        let round_ended = self.end_round(now, app_limited, largest_acked);
        if round_ended {
            self.check_full_pipe(app_limited);
        }
        self.update_ack_aggregation(now, acked);
        self.update_mode(now, in_flight, round_ended);
        self.update_window(acked);
    }

    fn on_congestion_event(&mut self, now: Instant, _sent: Instant, persistent: bool, lost_bytes: u64) {
        self.round_lost += lost_bytes;
        if persistent {
            // Everything sent over several PTOs was lost: the model no longer describes the path.
            self.window = self.min_window();
            self.bw = RoundMax::default();
            self.extra_acked = RoundMax::default();
            self.epoch_start = now;
            self.epoch_acked = 0;
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.window;
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const MTU: u16 = 1200;
    const PACKET: u64 = 1200;

    /// A path with a bottleneck of `capacity` bytes/s, an unlimited queue in front of it, a
    /// base round trip of `rtt`, and every `lose_every`-th packet lost (0: none); a sender that
    /// always has data. Steps in 100 us; returns the controller and the path's in-flight bytes.
    struct Path {
        bbr: Bbr,
        start: Instant,
        now: Instant,
        capacity: f64,
        rtt: Duration,
        lose_every: u64,
        /// (ack time, send time, lost) per packet in flight, in send order.
        flight: VecDeque<(Instant, Instant, bool)>,
        bottleneck_free: Instant,
        sent: u64,
        in_flight: u64,
        /// Acknowledgements leave the receiver only at multiples of this (0: at once), as from
        /// a busy receiver that reads its socket once per loop turn.
        ack_batch: Duration,
        acked_bytes: u64,
    }

    impl Path {
        fn new(capacity: f64, rtt: Duration, lose_every: u64) -> Path {
            #[allow(clippy::disallowed_methods)] // only an origin: everything after is virtual
            let start = Instant::now();
            Path {
                bbr: Bbr::new(None, start, MTU),
                start,
                now: start,
                capacity,
                rtt,
                lose_every,
                flight: VecDeque::new(),
                bottleneck_free: start,
                sent: 0,
                in_flight: 0,
                ack_batch: Duration::ZERO,
                acked_bytes: 0,
            }
        }

        fn run_until(&mut self, at: Duration, mut each: impl FnMut(&Bbr, Duration)) {
            while self.now < self.start + at {
                self.now += Duration::from_micros(100);
                let now = self.now;
                // Acknowledgements (and loss detection) due by now, one batch per step.
                let mut acked_any = false;
                while self.flight.front().is_some_and(|(ack, _, _)| *ack <= now) {
                    let (_, sent, lost) = self.flight.pop_front().unwrap();
                    self.in_flight -= PACKET;
                    if lost {
                        self.bbr.on_congestion_event(now, sent, false, PACKET);
                    } else {
                        self.bbr.acked(now, sent, PACKET);
                        self.acked_bytes += PACKET;
                        acked_any = true;
                    }
                }
                if acked_any {
                    self.bbr.on_end_acks(now, self.in_flight, false, Some(self.sent));
                }
                while self.in_flight + PACKET <= self.bbr.window() {
                    self.sent += 1;
                    self.bbr.on_sent(now, PACKET, self.sent);
                    let served = self.bottleneck_free.max(now) + Duration::from_secs_f64(PACKET as f64 / self.capacity);
                    self.bottleneck_free = served;
                    let lost = self.lose_every > 0 && self.sent % self.lose_every == 0;
                    let mut ack_at = served + self.rtt;
                    if !self.ack_batch.is_zero() {
                        let since = (ack_at - self.start).as_nanos();
                        let batch = self.ack_batch.as_nanos();
                        ack_at = self.start + Duration::from_nanos(since.div_ceil(batch) as u64 * batch as u64);
                    }
                    self.flight.push_back((ack_at, now, lost));
                    self.in_flight += PACKET;
                }
                each(&self.bbr, now - self.start);
            }
        }
    }

    fn bdp(capacity: f64, rtt: Duration) -> u64 {
        (capacity * rtt.as_secs_f64()) as u64
    }

    #[test]
    fn finds_the_bottleneck_and_keeps_twice_its_bdp_in_flight() {
        let (capacity, rtt) = (1_250_000.0, Duration::from_millis(30));
        let mut path = Path::new(capacity, rtt, 0);
        path.run_until(Duration::from_secs(3), |_, _| {});
        let bbr = &path.bbr;
        assert_eq!(bbr.mode(), Mode::Cruise);
        let bw = bbr.bandwidth() as f64;
        // A maximum over rounds of per-round rates: it may read a few percent high, never low.
        assert!(bw >= capacity * 0.97 && bw < capacity * 1.10, "bandwidth {bw} for a {capacity} B/s path");
        let min_rtt = bbr.min_rtt().unwrap();
        assert!(min_rtt >= rtt && min_rtt < rtt + Duration::from_millis(2), "min RTT {min_rtt:?}");
        let target = 2 * bdp(capacity, rtt);
        assert!(
            bbr.window() >= target && bbr.window() < target * 3 / 2,
            "window {} for 2 x BDP {target}",
            bbr.window()
        );
    }

    #[test]
    fn a_receiver_acknowledging_in_bursts_still_gets_the_bandwidth() {
        // 200 us of path, but acknowledgements only every 5 ms: the min RTT is a fraction of the
        // round trip the data sees, and the window must cover the burst, not the min RTT.
        let (capacity, rtt) = (12_500_000.0, Duration::from_micros(200));
        let mut path = Path::new(capacity, rtt, 0);
        path.ack_batch = Duration::from_millis(5);
        path.run_until(Duration::from_secs(2), |_, _| {});
        let before = path.acked_bytes;
        path.run_until(Duration::from_secs(3), |_, _| {});
        let rate = (path.acked_bytes - before) as f64;
        assert!(rate >= capacity * 0.9, "{rate} B/s of {capacity}, window {}", path.bbr.window());
    }

    #[test]
    fn random_loss_does_not_shrink_the_window() {
        let (capacity, rtt) = (1_250_000.0, Duration::from_millis(30));
        let mut path = Path::new(capacity, rtt, 10);
        let mut smallest_after_startup = u64::MAX;
        path.run_until(Duration::from_secs(5), |bbr, t| {
            if t > Duration::from_secs(2) {
                smallest_after_startup = smallest_after_startup.min(bbr.window());
            }
        });
        // One packet in ten is lost: the delivery rate, and the window with it, drop by a tenth,
        // not by the factor a loss-based controller applies per loss.
        let floor = 2 * bdp(capacity * 0.9, rtt) * 95 / 100;
        assert!(smallest_after_startup >= floor, "window fell to {smallest_after_startup}, floor {floor}");
    }

    #[test]
    fn rounds_that_lose_most_of_their_burst_halve_and_cap_the_window() {
        // What an overloaded receiver does to a fast sender: its socket buffer takes the head
        // of each burst and drops the rest, round after round. Pure BBR reads only delivery
        // rate and RTT and kept sending the same bursts: a flooded QoS 0 subscriber got nothing
        // at all (BENCHMARKS.md, the mqttv5 bench regression check).
        let (capacity, rtt) = (12_500_000.0, Duration::from_millis(2));
        let mut path = Path::new(capacity, rtt, 0);
        path.run_until(Duration::from_secs(1), |_, _| {});
        let before = path.bbr.window();
        // One round of 40 packets, 20 of them lost.
        let t = path.now;
        for i in 0..40 {
            path.sent += 1;
            path.bbr.on_sent(t, PACKET, path.sent);
            if i % 2 == 0 {
                path.bbr.acked(t + rtt, t, PACKET);
            } else {
                path.bbr.on_congestion_event(t + rtt, t, false, PACKET);
            }
        }
        path.bbr.on_end_acks(t + rtt, 0, false, Some(path.sent));
        let capped = path.bbr.window();
        assert!(capped <= before / 2 + PACKET, "window {capped} after heavy loss, {before} before");
        // Loss-free rounds let it grow back, to the model's target in the end.
        path.now = t + rtt;
        path.run_until(Duration::from_secs(3), |_, _| {});
        assert!(path.bbr.window() >= before * 9 / 10, "window {} did not regrow to {before}", path.bbr.window());
    }

    #[test]
    fn persistent_congestion_collapses_the_window_and_it_regrows() {
        let (capacity, rtt) = (1_250_000.0, Duration::from_millis(30));
        let mut path = Path::new(capacity, rtt, 0);
        path.run_until(Duration::from_secs(2), |_, _| {});
        let before = path.bbr.window();
        path.bbr.on_congestion_event(path.now, path.now, true, before);
        assert_eq!(path.bbr.window(), 4 * PACKET);
        path.run_until(Duration::from_secs(4), |_, _| {});
        assert!(path.bbr.window() >= before * 9 / 10, "window {} did not regrow to {before}", path.bbr.window());
    }

    #[test]
    fn probes_rtt_when_the_minimum_goes_stale_and_keeps_it() {
        let (capacity, rtt) = (1_250_000.0, Duration::from_millis(30));
        let mut path = Path::new(capacity, rtt, 0);
        let mut probes = Vec::new();
        let mut last = Mode::Startup;
        path.run_until(Duration::from_secs(25), |bbr, t| {
            if bbr.mode() == Mode::ProbeRtt && last != Mode::ProbeRtt {
                probes.push(t);
            }
            last = bbr.mode();
        });
        // Cruising keeps a queue of one BDP, so no sample matches the minimum again and it expires
        // every 10 s; each probe drains the queue and finds the base RTT again.
        assert_eq!(probes.len(), 2, "ProbeRtt entered at {probes:?}");
        assert!(probes[0] > Duration::from_secs(10) && probes[0] < Duration::from_secs(12), "{probes:?}");
        assert_eq!(path.bbr.mode(), Mode::Cruise);
        assert!(path.bbr.min_rtt().unwrap() < rtt + Duration::from_millis(2), "min RTT {:?}", path.bbr.min_rtt());
    }

    #[test]
    fn same_events_same_windows() {
        let trace = || {
            let mut path = Path::new(900_000.0, Duration::from_millis(40), 7);
            let mut windows = Vec::new();
            path.run_until(Duration::from_secs(3), |bbr, _| windows.push(bbr.window()));
            windows
        };
        assert_eq!(trace(), trace());
    }
}
