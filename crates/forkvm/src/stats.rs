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
    }
}
