//! `/metrics` in the Prometheus text format: sandboxes by state, create/fork/wake latency
//! histograms, host memory in use and memory shared between clones.

use forkvm_api::v1::{CameUp, SandboxState};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use forkvm_api::vm::PageServerStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type Hist = Family<Labels, Histogram, fn() -> Histogram>;

fn ms_histogram() -> Histogram {
    // 0.25 ms .. ~8 s
    Histogram::new(exponential_buckets(0.25, 2.0, 16))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    create_ms: Hist,
    fork_ms: Hist,
    wake_ms: Hist,
    sandboxes: Family<Labels, Gauge>,
    host_mem_used: Gauge,
    host_mem_shared: Gauge,
    vmm_rss: Gauge,
    preview: Family<Labels, Counter>,
    preview_open: Gauge,
    api_open: Family<Labels, Gauge>,
    api_refused: Family<Labels, Counter>,
    pagesrv_faults: Counter,
    pagesrv_sandboxes: Gauge,
    pagesrv_latency: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Faults last seen per VMM pid (the counter adds what each page server served since).
    pagesrv_seen: Mutex<HashMap<u32, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("forkvm");
        let create_ms: Hist = Family::new_with_constructor(ms_histogram);
        let fork_ms: Hist = Family::new_with_constructor(ms_histogram);
        let wake_ms: Hist = Family::new_with_constructor(ms_histogram);
        let sandboxes = Family::<Labels, Gauge>::default();
        let (host_mem_used, host_mem_shared, vmm_rss) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register("create_ms", "Sandbox create latency (ms) by source", create_ms.clone());
        registry.register("fork_ms", "Live fork latency through the API (ms)", fork_ms.clone());
        registry.register("wake_ms", "Resume (kind=resumed) and wake (kind=woken) latency (ms)", wake_ms.clone());
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        registry.register(
            "host_memory_used_bytes",
            "Host memory in use (MemTotal - MemAvailable)",
            host_mem_used.clone(),
        );
        registry.register(
            "vmm_memory_shared_bytes",
            "Memory of VMM processes shared with others (Rss - Pss: copy-on-write between clones)",
            host_mem_shared.clone(),
        );
        registry.register("vmm_memory_rss_bytes", "Resident memory of all VMM processes", vmm_rss.clone());
        let preview = Family::<Labels, Counter>::default();
        registry.register("preview_connections", "Preview proxy connections by outcome", preview.clone());
        let preview_open = Gauge::default();
        registry.register(
            "preview_connections_open",
            "Preview proxy connections holding one of the --preview-max-connections slots",
            preview_open.clone(),
        );
        let api_open = Family::<Labels, Gauge>::default();
        registry.register(
            "api_connections_open",
            "API connections holding one of their listener's --api-max-connections slots, by listener",
            api_open.clone(),
        );
        let api_refused = Family::<Labels, Counter>::default();
        registry.register(
            "api_connections_refused",
            "API connections answered 503 (or closed) for want of a slot, by listener",
            api_refused.clone(),
        );
        let pagesrv_faults = Counter::default();
        let pagesrv_sandboxes = Gauge::default();
        let pagesrv_latency = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "pagesrv_faults",
            "Page faults served by the page servers of lazily woken sandboxes",
            pagesrv_faults.clone(),
        );
        registry.register(
            "pagesrv_sandboxes",
            "Sandboxes whose memory is still served lazily by a page server",
            pagesrv_sandboxes.clone(),
        );
        registry.register(
            "pagesrv_fault_latency_us",
            "Page fault service latency (us): the highest quantile among live page servers",
            pagesrv_latency.clone(),
        );
        Metrics {
            registry,
            create_ms,
            fork_ms,
            wake_ms,
            sandboxes,
            host_mem_used,
            host_mem_shared,
            vmm_rss,
            preview,
            preview_open,
            api_open,
            api_refused,
            pagesrv_faults,
            pagesrv_sandboxes,
            pagesrv_latency,
            pagesrv_seen: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn observe_create(&self, from_template: bool, ms: f64) {
        let source = if from_template { "template" } else { "boot" };
        self.create_ms.get_or_create(&vec![("source".into(), source.into())]).observe(ms);
    }

    pub fn observe_fork(&self, ms: f64) {
        self.fork_ms.get_or_create(&vec![]).observe(ms);
    }

    pub fn observe_wake(&self, how: CameUp, ms: f64) {
        self.wake_ms.get_or_create(&vec![("kind".into(), how.as_str().into())]).observe(ms);
    }

    /// One preview connection ended as `result` (relayed, not_found, bad_request, ...).
    pub fn observe_preview(&self, result: &str) {
        self.preview.get_or_create(&vec![("result".into(), result.into())]).inc();
    }

    /// A preview connection took (`true`) or gave back (`false`) one of the proxy's slots.
    pub fn preview_slot(&self, taken: bool) {
        if taken {
            self.preview_open.inc();
        } else {
            self.preview_open.dec();
        }
    }

    /// An API connection on `listener` took (`true`) or gave back (`false`) one of its slots.
    pub fn api_slot(&self, listener: &str, taken: bool) {
        let g = self.api_open.get_or_create(&vec![("listener".into(), listener.into())]);
        if taken {
            g.inc();
        } else {
            g.dec();
        }
    }

    /// An API connection on `listener` found no slot.
    pub fn api_refused(&self, listener: &str) {
        self.api_refused.get_or_create(&vec![("listener".into(), listener.into())]).inc();
    }

    /// Takes the page-server counters of the live VMMs (pid, stats): the fault counter grows by
    /// what each served since the last look; a VMM no longer listed is forgotten.
    pub fn observe_page_servers(&self, live: &[(u32, PageServerStats)]) {
        let mut seen = self.pagesrv_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut p50, mut p99) = (0f64, 0f64);
        let mut next = HashMap::new();
        for (pid, s) in live {
            let before = seen.get(pid).copied().unwrap_or(0);
            self.pagesrv_faults.inc_by(s.faults.saturating_sub(before));
            next.insert(*pid, s.faults.max(before));
            p50 = p50.max(s.fault_p50_us.unwrap_or(0.0));
            p99 = p99.max(s.fault_p99_us.unwrap_or(0.0));
        }
        *seen = next;
        self.pagesrv_sandboxes.set(live.len() as i64);
        self.pagesrv_latency.get_or_create(&vec![("quantile".into(), "0.5".into())]).set(p50);
        self.pagesrv_latency.get_or_create(&vec![("quantile".into(), "0.99".into())]).set(p99);
    }

    /// Renders everything, refreshing the gauges from `by_state` and the VMM pids.
    pub fn render(&self, by_state: &[(String, i64)], pids: &[u32]) -> String {
        for s in SandboxState::ALL {
            let n = by_state.iter().find(|(k, _)| k == s.as_str()).map_or(0, |(_, n)| *n);
            self.sandboxes.get_or_create(&vec![("state".into(), s.as_str().into())]).set(n);
        }
        if let (Some(total), Some(avail)) = (meminfo_kib("MemTotal"), meminfo_kib("MemAvailable")) {
            self.host_mem_used.set(((total - avail) * 1024) as i64);
        }
        let (mut rss, mut pss) = (0u64, 0u64);
        for pid in pids {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
                rss += field_kib(&s, "Rss:").unwrap_or(0) * 1024;
                pss += field_kib(&s, "Pss:").unwrap_or(0) * 1024;
            }
        }
        self.vmm_rss.set(rss as i64);
        self.host_mem_shared.set(rss.saturating_sub(pss) as i64);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}

fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    field_kib(&s, &format!("{key}:"))
}

/// MemAvailable in MiB.
pub fn mem_available_mib() -> Option<u64> {
    meminfo_kib("MemAvailable").map(|k| k / 1024)
}
