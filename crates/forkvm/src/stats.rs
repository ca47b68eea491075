//! Median/min/max tables for the benchmarks.

use std::time::Duration;

/// Samples of one measured quantity.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub name: String,
    pub values: Vec<f64>,
    pub unit: &'static str,
}

impl Samples {
    pub fn new(name: &str, unit: &'static str) -> Self {
        Samples { name: name.to_string(), values: Vec::new(), unit }
    }

    pub fn push_duration(&mut self, d: Duration) {
        self.values.push(d.as_secs_f64() * 1e3);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

/// Renders rows as an aligned table: name, median, min, max, unit, samples.
pub fn table(title: &str, rows: &[Samples]) -> String {
    let mut out = format!("{title}\n");
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(10).max(10);
    out += &format!("{:<w$} {:>12} {:>12} {:>12}  {:<5} {:>3}\n", "metric", "median", "min", "max", "unit", "n");
    for r in rows {
        let v = r.sorted();
        let (min, max) = (v.first().copied().unwrap_or(f64::NAN), v.last().copied().unwrap_or(f64::NAN));
        out +=
            &format!("{:<w$} {:>12.3} {:>12.3} {:>12.3}  {:<5} {:>3}\n", r.name, r.median(), min, max, r.unit, v.len());
    }
    out
}

impl Samples {
    /// The `q` quantile (0..=1), nearest rank.
    pub fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = (q * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }
}

/// Renders rows with p50, p99 and [min–max]: name, p50, p99, min, max, unit, samples.
pub fn table_p99(title: &str, rows: &[Samples]) -> String {
    let mut out = format!("{title}\n");
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(10).max(10);
    out += &format!(
        "{:<w$} {:>10} {:>10} {:>10} {:>10}  {:<5} {:>4}\n",
        "metric", "p50", "p99", "min", "max", "unit", "n"
    );
    for r in rows {
        let v = r.sorted();
        let (min, max) = (v.first().copied().unwrap_or(f64::NAN), v.last().copied().unwrap_or(f64::NAN));
        out += &format!(
            "{:<w$} {:>10.3} {:>10.3} {:>10.3} {:>10.3}  {:<5} {:>4}\n",
            r.name,
            r.quantile(0.5),
            r.quantile(0.99),
            min,
            max,
            r.unit,
            v.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_table() {
        let mut s = Samples::new("x", "ms");
        for v in [3.0, 1.0, 2.0] {
            s.values.push(v);
        }
        assert_eq!(s.median(), 2.0);
        s.values.push(4.0);
        assert_eq!(s.median(), 2.5);
        let t = table("T", &[s]);
        assert!(t.contains("2.500"));
        assert!(t.contains("4.000"));
        let mut q = Samples::new("q", "ms");
        q.values = (1..=200).map(f64::from).collect();
        assert_eq!((q.quantile(0.5), q.quantile(0.99), q.quantile(1.0)), (100.0, 198.0, 200.0));
        assert!(table_p99("T", &[q]).contains("198.000"));
    }
}
