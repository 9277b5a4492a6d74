//! Line charts as small, self-contained SVG documents: title, axes with
//! ticks and labels, one polyline per series, a legend under the plot.
//! Written by hand: the charts are simple and a plotting crate would pull in
//! fonts and rasterisers for nothing.

use std::fmt::Write;

/// How the x axis maps values to pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Powers of two evenly spaced (concurrency sweeps 1, 2, 4, ... 256).
    Log2,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    /// (x, y) in data units, drawn in this order.
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: Scale,
    /// A dot on every point (sparse data such as a sweep); off for curves of
    /// many samples.
    pub markers: bool,
    pub series: Vec<Series>,
}

/// Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
const PALETTE: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

const WIDTH: f64 = 760.0;
const LEFT: f64 = 86.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 48.0;
const PLOT_H: f64 = 320.0;
/// Space under the plot for tick labels and the x label.
const BELOW: f64 = 58.0;
const LEGEND_LINE: f64 = 18.0;

/// Text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// An axis: its value range, scale and tick positions.
struct Axis {
    lo: f64,
    hi: f64,
    scale: Scale,
    ticks: Vec<f64>,
}

impl Axis {
    /// Linear axis covering `lo..hi` (`from_zero`: extended down to 0) with
    /// about six ticks at 1, 2 or 5 times a power of ten.
    fn linear(lo: f64, hi: f64, from_zero: bool) -> Axis {
        let lo = if from_zero { lo.min(0.0) } else { lo };
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            // A single value: centre it in a range of its own size.
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (if from_zero && lo >= 0.0 { 0.0 } else { lo - pad }, hi + pad)
        };
        let rough = (hi - lo) / 6.0;
        let mag = 10f64.powf(rough.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= rough)
            .unwrap_or(10.0 * mag);
        let first = (lo / step).floor() * step;
        let last = (hi / step).ceil() * step;
        let count = ((last - first) / step).round() as usize;
        let ticks = (0..=count).map(|i| first + i as f64 * step).collect();
        Axis {
            lo: first,
            hi: last,
            scale: Scale::Linear,
            ticks,
        }
    }

    /// Log2 axis from the power of two at or below `lo` to the one at or
    /// above `hi` (both must be > 0), a tick at each power (every other
    /// power when there would be more than 12).
    fn log2(lo: f64, hi: f64) -> Axis {
        let a = lo.log2().floor() as i32;
        let b = (hi.log2().ceil() as i32).max(a + 1);
        let stride = if b - a > 12 { 2 } else { 1 };
        let ticks = (a..=b).step_by(stride).map(|e| 2f64.powi(e)).collect();
        Axis {
            lo: 2f64.powi(a),
            hi: 2f64.powi(b),
            scale: Scale::Log2,
            ticks,
        }
    }

    /// Position of `v` along the axis, 0 at `lo` and 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log2 => (v.log2() - self.lo.log2()) / (self.hi.log2() - self.lo.log2()),
        }
    }

    /// Tick label: as many decimals as the tick spacing needs.
    fn label(&self, v: f64) -> String {
        let step = match self.ticks.as_slice() {
            [a, b, ..] => (b - a).abs(),
            _ => 1.0,
        };
        let decimals = if step >= 1.0 || self.scale == Scale::Log2 {
            0
        } else {
            (-step.log10().floor()) as usize
        };
        format!("{v:.decimals$}")
    }
}

/// Bounds of every finite point; `None` when there is none.
fn bounds(chart: &Chart, x_positive: bool) -> Option<(f64, f64, f64, f64)> {
    let mut it = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!x_positive || *x > 0.0));
    let &(x0, y0) = it.next()?;
    Some(it.fold((x0, x0, y0, y0), |(a, b, c, d), &(x, y)| {
        (a.min(x), b.max(x), c.min(y), d.max(y))
    }))
}

/// The chart as an SVG document. The y axis starts at 0 (throughputs and
/// cumulative fractions are never negative); a `Log2` x axis ignores points
/// with x <= 0, which it cannot place.
pub fn render(chart: &Chart) -> String {
    let log = chart.x_scale == Scale::Log2;
    let (x_lo, x_hi, y_lo, y_hi) = bounds(chart, log).unwrap_or((1.0, 2.0, 0.0, 1.0));
    let xa = if log {
        Axis::log2(x_lo, x_hi)
    } else {
        Axis::linear(x_lo, x_hi, false)
    };
    let ya = Axis::linear(y_lo, y_hi, true);
    let plot_w = WIDTH - LEFT - RIGHT;
    let height = TOP + PLOT_H + BELOW + LEGEND_LINE * chart.series.len() as f64 + 10.0;
    let px = |x: f64| LEFT + xa.frac(x) * plot_w;
    let py = |y: f64| TOP + PLOT_H - ya.frac(y) * PLOT_H;
    let bottom = TOP + PLOT_H;

    let mut s = String::new();
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, "<title>{}</title>", escape(&chart.title));
    let _ = writeln!(s, r##"<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text class="title" x="{}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape(&chart.title)
    );

    let _ = writeln!(s, r##"<g class="grid" stroke="#e6e6e6" stroke-width="1">"##);
    for &t in &ya.ticks {
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/>"#,
            LEFT + plot_w,
            y = py(t)
        );
    }
    for &t in &xa.ticks {
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}"/>"#,
            x = px(t)
        );
    }
    let _ = writeln!(s, "</g>");

    let _ = writeln!(s, r##"<g class="axes" stroke="#333333" stroke-width="1">"##);
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{bottom}" x2="{:.1}" y2="{bottom}"/>"#,
        LEFT + plot_w
    );
    let _ = writeln!(s, r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}"/>"#);
    for &t in &xa.ticks {
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}"/>"#,
            bottom + 5.0,
            x = px(t)
        );
    }
    for &t in &ya.ticks {
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{LEFT}" y2="{y:.1}"/>"#,
            LEFT - 5.0,
            y = py(t)
        );
    }
    let _ = writeln!(s, "</g>");

    let _ = writeln!(s, r##"<g class="tick-labels" fill="#333333">"##);
    for &t in &xa.ticks {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(t),
            bottom + 19.0,
            xa.label(t)
        );
    }
    for &t in &ya.ticks {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            py(t) + 4.0,
            ya.label(t)
        );
    }
    let _ = writeln!(s, "</g>");

    let _ = writeln!(
        s,
        r#"<text class="x-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        bottom + 42.0,
        escape(&chart.x_label)
    );
    let (lx, ly) = (18.0, TOP + PLOT_H / 2.0);
    let _ = writeln!(
        s,
        r#"<text class="y-label" x="{lx}" y="{ly}" text-anchor="middle" transform="rotate(-90 {lx} {ly})">{}</text>"#,
        escape(&chart.y_label)
    );

    let _ = writeln!(s, r#"<g class="series" fill="none" stroke-width="2">"#);
    for (i, series) in chart.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = series
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log || *x > 0.0))
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        let list = pts
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            s,
            r#"<polyline data-series="{}" stroke="{colour}" points="{list}"/>"#,
            escape(&series.label)
        );
        if chart.markers {
            for (x, y) in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}" stroke="none"/>"#
                );
            }
        }
    }
    let _ = writeln!(s, "</g>");

    let _ = writeln!(s, r#"<g class="legend">"#);
    for (i, series) in chart.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let y = bottom + BELOW + LEGEND_LINE * i as f64 + 6.0;
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="3"/>"#,
            LEFT + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 32.0,
            y + 4.0,
            escape(&series.label)
        );
    }
    let _ = writeln!(s, "</g>");
    s.push_str("</svg>\n");
    s
}
