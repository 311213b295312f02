//! The last 15 minutes of a few series, kept in the relay's memory for the console's
//! charts (`GET /v1/history`): every [`STEP`] a sampler reads the relay's own Prometheus
//! page (counters become rates, gauges are taken as they are, summed over the labels a
//! chart does not split by) and asks the relay for values it computes itself (a sink's
//! lag in seconds). At most [`MAX_SERIES`] series per chart, [`POINTS`] points each: a
//! few hundred kilobytes at most.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

/// Time between samples.
pub const STEP: Duration = Duration::from_secs(5);

/// How far back the series go.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

/// Points per series (the window over the step).
pub const POINTS: usize = (WINDOW.as_secs() / STEP.as_secs()) as usize;

/// Series per chart kept at most (the first ones seen).
pub const MAX_SERIES: usize = 32;

/// How a chart reads its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// A counter, charted as its rate per second.
    Rate,
    /// A gauge, charted as it is.
    Gauge,
    /// Not from the metrics page: values the relay gives ([`Extra`]).
    Given,
    /// Given by the relay too, but a running total: charted as its rate per second.
    GivenRate,
}

/// One chart.
#[derive(Debug, Clone, Copy)]
pub struct Chart {
    /// Its id in the JSON.
    pub id: &'static str,
    /// Its title.
    pub title: &'static str,
    /// `bytes/s`, `bytes`, `seconds`, `records`, `count`.
    pub unit: &'static str,
    /// The metric (unused with [`Read::Given`] and [`Read::GivenRate`]).
    pub metric: &'static str,
    /// The label whose values name the series (others are summed over).
    pub by: &'static str,
    /// How the metric is read.
    pub read: Read,
}

/// Values a relay computes itself, each sample: (chart id, series name, value).
pub type Extra = Box<dyn Fn() -> Vec<(&'static str, String, f64)> + Send + Sync>;

/// The kept series.
pub struct History {
    charts: Vec<Chart>,
    /// Metrics whose every labelled value of the last sample is kept ([`History::last`]).
    keep: Vec<&'static str>,
    state: Mutex<State>,
}

/// A metric's labels and value.
pub type Labelled = (Vec<(String, String)>, f64);

#[derive(Default)]
struct State {
    /// (chart, series) → points (unix seconds, value), oldest first.
    series: BTreeMap<(usize, String), VecDeque<(f64, f64)>>,
    /// (chart, series) → the counter's sum at the previous sample, and when.
    previous: HashMap<(usize, String), (f64, f64)>,
    /// The last sample of the kept metrics.
    last: HashMap<&'static str, Vec<Labelled>>,
}

impl History {
    /// A history of `charts`, empty; of the metrics in `keep`, the last sample is kept
    /// whole.
    pub fn new(charts: Vec<Chart>, keep: Vec<&'static str>) -> Arc<History> {
        Arc::new(History {
            charts,
            keep,
            state: Mutex::new(State::default()),
        })
    }

    /// The last sample of `metric` (one of `keep`): each labelled value.
    pub fn last(&self, metric: &str) -> Vec<Labelled> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.last.get(metric).cloned().unwrap_or_default()
    }

    /// Samples `prom` and `extra` every [`STEP`] from now on (on the current runtime).
    pub fn spawn(self: &Arc<Self>, prom: PrometheusHandle, extra: Extra) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                me.sample(&prom.render(), &extra(), now);
            }
        });
    }

    /// Takes one sample at `now` (unix seconds): `page` is a Prometheus text page.
    pub fn sample(&self, page: &str, extra: &[(&'static str, String, f64)], now: f64) {
        // Sum each chart's metric by its series label.
        let mut sums: BTreeMap<(usize, String), f64> = BTreeMap::new();
        let mut last: HashMap<&'static str, Vec<Labelled>> = HashMap::new();
        for line in page.lines() {
            let Some((name, labels, value)) = parse_line(line) else {
                continue;
            };
            if let Some(k) = self.keep.iter().find(|k| **k == name) {
                let l = labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                last.entry(k).or_default().push((l, value));
            }
            for (i, c) in self.charts.iter().enumerate() {
                if matches!(c.read, Read::Given | Read::GivenRate) || c.metric != name {
                    continue;
                }
                let key = labels
                    .iter()
                    .find(|(k, _)| *k == c.by)
                    .map_or_else(|| "all".to_string(), |(_, v)| v.clone());
                *sums.entry((i, key)).or_default() += value;
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.last = last;
        let mut points: Vec<((usize, String), f64)> = Vec::new();
        let given = extra.iter().filter_map(|(id, key, v)| {
            let i = self.charts.iter().position(|c| c.id == *id)?;
            Some(((i, key.clone()), *v))
        });
        for ((i, key), v) in sums.into_iter().chain(given) {
            match self.charts[i].read {
                Read::Gauge | Read::Given => points.push(((i, key), v)),
                Read::Rate | Read::GivenRate => {
                    let prev = st.previous.insert((i, key.clone()), (v, now));
                    if let Some((pv, pt)) = prev {
                        // A counter that went down was reset (a reload re-registered it):
                        // no rate for this step.
                        if v >= pv && now > pt {
                            points.push(((i, key), (v - pv) / (now - pt)));
                        }
                    }
                }
            }
        }
        for ((i, key), v) in points {
            if !v.is_finite() {
                continue;
            }
            let key = (i, key);
            // A new series only while its chart has room (counted only then).
            if !st.series.contains_key(&key)
                && st.series.keys().filter(|(c, _)| *c == i).count() >= MAX_SERIES
            {
                continue;
            }
            let s = st.series.entry(key).or_default();
            s.push_back((now, v));
            while s.len() > POINTS {
                s.pop_front();
            }
        }
        // Forget what has not been seen for a whole window.
        let horizon = now - WINDOW.as_secs_f64();
        st.series.retain(|_, s| {
            while s.front().is_some_and(|(t, _)| *t < horizon) {
                s.pop_front();
            }
            !s.is_empty()
        });
        st.previous.retain(|_, (_, t)| *t >= horizon);
    }

    /// The last value of a chart's series.
    pub fn latest(&self, chart: &str, series: &str) -> Option<f64> {
        let i = self.charts.iter().position(|c| c.id == chart)?;
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.series
            .get(&(i, series.to_string()))
            .and_then(|s| s.back())
            .map(|(_, v)| *v)
    }

    /// `GET /v1/history`.
    pub fn to_json(&self) -> serde_json::Value {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let charts: Vec<_> = self
            .charts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let series: Vec<_> = st
                    .series
                    .iter()
                    .filter(|((ci, _), _)| *ci == i)
                    .map(|((_, name), pts)| {
                        let pts: Vec<[f64; 2]> = pts.iter().map(|(t, v)| [*t, *v]).collect();
                        json!({ "name": name, "points": pts })
                    })
                    .collect();
                json!({ "id": c.id, "title": c.title, "unit": c.unit, "series": series })
            })
            .collect();
        json!({
            "step_seconds": STEP.as_secs(),
            "window_seconds": WINDOW.as_secs(),
            "charts": charts,
        })
    }
}

/// A parsed sample: name, labels, value.
type Sample<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// `name{k="v",...} value [timestamp]` of a Prometheus text line; `None` for comments,
/// blank lines and anything malformed.
fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let rest = if line[name_end..].starts_with('{') {
        let mut rest = &line[name_end + 1..];
        loop {
            rest = rest.trim_start_matches(',').trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                break r;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].trim();
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key, value));
            rest = &rest[end + 1..];
        }
    } else {
        &line[name_end..]
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charts() -> Vec<Chart> {
        vec![
            Chart {
                id: "throughput",
                title: "Throughput",
                unit: "bytes/s",
                metric: "routy_stream_bytes_total",
                by: "listener",
                read: Read::Rate,
            },
            Chart {
                id: "wal",
                title: "Retained WAL",
                unit: "bytes",
                metric: "routy_cdc_source_retained_wal_bytes",
                by: "source",
                read: Read::Gauge,
            },
            Chart {
                id: "lag",
                title: "Lag",
                unit: "seconds",
                metric: "",
                by: "",
                read: Read::Given,
            },
            Chart {
                id: "session",
                title: "Throughput per session",
                unit: "bytes/s",
                metric: "",
                by: "",
                read: Read::GivenRate,
            },
        ]
    }

    fn page(a: u64, b: u64, wal: u64) -> String {
        format!(
            "# HELP routy_stream_bytes_total Bytes.\n# TYPE routy_stream_bytes_total counter\n\
             routy_stream_bytes_total{{listener=\"pg\",direction=\"to_service\"}} {a}\n\
             routy_stream_bytes_total{{direction=\"to_client\",listener=\"pg\"}} {b}\n\
             routy_stream_bytes_total{{listener=\"we\\\"ird\",direction=\"to_client\"}} 7\n\
             routy_cdc_source_retained_wal_bytes{{source=\"app\"}} {wal}\n\
             garbage{{unclosed=\"x 3\nnovalue\n"
        )
    }

    #[test]
    fn rates_gauges_and_given_values() {
        let h = History::new(charts(), vec!["routy_cdc_source_retained_wal_bytes"]);
        h.sample(&page(100, 1000, 5), &[], 1000.0);
        assert_eq!(
            h.last("routy_cdc_source_retained_wal_bytes"),
            vec![(vec![("source".to_string(), "app".to_string())], 5.0)]
        );
        assert!(h.last("routy_stream_bytes_total").is_empty());
        // No rate after one sample.
        assert_eq!(h.latest("throughput", "pg"), None);
        assert_eq!(h.latest("wal", "app"), Some(5.0));
        h.sample(
            &page(600, 1500, 9),
            &[
                ("lag", "sink1".into(), 2.5),
                ("session", "a #1".into(), 50.0),
            ],
            1005.0,
        );
        assert_eq!(
            h.latest("session", "a #1"),
            None,
            "a total: no rate from one"
        );
        assert_eq!(h.latest("throughput", "pg"), Some(200.0));
        assert_eq!(h.latest("throughput", "we\"ird"), Some(0.0));
        assert_eq!(h.latest("wal", "app"), Some(9.0));
        assert_eq!(h.latest("lag", "sink1"), Some(2.5));
        // A reset counter gives no rate for that step, then rates again.
        h.sample(
            &page(10, 10, 9),
            &[("session", "a #1".into(), 550.0)],
            1010.0,
        );
        assert_eq!(h.latest("session", "a #1"), Some(100.0));
        assert_eq!(h.latest("throughput", "pg"), Some(200.0));
        h.sample(&page(60, 10, 9), &[], 1015.0);
        assert_eq!(h.latest("throughput", "pg"), Some(10.0));
        let j = h.to_json();
        assert_eq!(j["step_seconds"], 5);
        assert_eq!(
            j["charts"][1]["series"][0]["points"][0],
            json!([1000.0, 5.0])
        );
        // Points older than the window go, and so does a series no longer seen.
        h.sample("", &[], 1015.0 + WINDOW.as_secs_f64() + 1.0);
        assert_eq!(h.latest("wal", "app"), None);
    }

    #[test]
    fn bounded_in_points_and_series() {
        let h = History::new(charts(), vec![]);
        for i in 0..(POINTS + 50) {
            let extra: Vec<_> = (0..(MAX_SERIES + 10))
                .map(|s| ("lag", format!("s{s}"), i as f64))
                .collect();
            h.sample("", &extra, i as f64 * 5.0);
        }
        let st = h.state.lock().unwrap();
        assert_eq!(st.series.len(), MAX_SERIES);
        assert!(st.series.values().all(|s| s.len() == POINTS));
    }

    #[test]
    fn lines_parse_or_are_skipped() {
        assert_eq!(parse_line("a_total 3"), Some(("a_total", vec![], 3.0)));
        assert_eq!(
            parse_line("a{x=\"1\",y=\"a\\\\b\"} 2.5 1700000000"),
            Some(("a", vec![("x", "1".into()), ("y", "a\\b".into())], 2.5))
        );
        assert_eq!(parse_line("b +Inf").map(|l| l.2), Some(f64::INFINITY));
        for bad in ["", "# HELP x", "x", "x{y=1} 2", "x{y=\"1\" 2", "x nan?"] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
    }
}
