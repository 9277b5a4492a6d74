//! SVG charts: well-formed documents, one polyline per series, labelled
//! axes, and pixel positions that follow the data.

use kestrel_bench::report::plot::{ecdf_points, plots, write_plots};
use kestrel_bench::report::svg::{render, Chart, Scale, Series};
use kestrel_bench::report::Capsule;
use kestrel_bench::{Better, Row};
use serde_json::json;

/// Checks the document is balanced XML as far as these charts use it:
/// every tag closed in order, attributes quoted, no stray `<` or `&`.
/// Returns the element names in document order.
fn check_well_formed(svg: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut rest = svg;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "bare & in text: {text}"
            );
        }
        assert!(!text.contains('>'), "stray > in text: {text}");
        let close = rest[open..].find('>').expect("unterminated tag") + open;
        let tag = &rest[open + 1..close];
        assert!(!tag.contains('<'), "< inside tag: {tag}");
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "mismatched </{name}>");
        } else {
            let name: String = tag
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '/')
                .collect();
            assert!(!name.is_empty(), "empty tag name");
            names.push(name.clone());
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        rest = &rest[close + 1..];
    }
    assert!(rest.trim().is_empty(), "text after the root: {rest}");
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(names.first().map(String::as_str), Some("svg"));
    names
}

/// The pixel points of each polyline, by its `data-series` label.
fn polylines(svg: &str) -> Vec<(String, Vec<(f64, f64)>)> {
    svg.split("<polyline")
        .skip(1)
        .map(|chunk| {
            let attr = |name: &str| {
                let start = chunk.find(&format!("{name}=\"")).expect("attribute present") + name.len() + 2;
                let len = chunk[start..].find('"').expect("attribute closed");
                chunk[start..start + len].to_string()
            };
            let pts = attr("points")
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').expect("x,y pair");
                    (x.parse().expect("x number"), y.parse().expect("y number"))
                })
                .collect();
            (attr("data-series"), pts)
        })
        .collect()
}

/// Pixel x grows with data x and pixel y shrinks as data y grows (SVG's y
/// axis points down), for every pair of points.
fn assert_monotone(data: &[(f64, f64)], pixels: &[(f64, f64)]) {
    assert_eq!(data.len(), pixels.len());
    for i in 0..data.len() {
        for j in 0..data.len() {
            let (d, p) = ((data[i], data[j]), (pixels[i], pixels[j]));
            if d.0 .0 < d.1 .0 {
                assert!(p.0 .0 < p.1 .0, "x order lost: {d:?} -> {p:?}");
            }
            if d.0 .1 < d.1 .1 {
                assert!(p.0 .1 > p.1 .1, "y order lost: {d:?} -> {p:?}");
            }
        }
    }
}

fn sweep_capsule(name: &str, scale: f64) -> Capsule {
    let mut rows = Vec::new();
    for (c, tput) in [(1.0, 90.0), (4.0, 330.0), (16.0, 1100.0), (64.0, 2600.0)] {
        rows.push(
            Row::new(
                &format!("c={c}"),
                "output_tok_s",
                "tok/s",
                Better::Higher,
                vec![tput * scale],
            )
            .with_param("concurrency", c),
        );
        let ttft: Vec<f64> = (0..30).map(|i| (10.0 + i as f64 * c.sqrt()) * scale).collect();
        rows.push(
            Row::new(&format!("c={c}"), "ttft_ms", "ms", Better::Lower, ttft).with_param("concurrency", c),
        );
    }
    Capsule::from_json(name, &json!({"result": {"kind": "bench-serve", "rows": rows}})).expect("capsule")
}

#[test]
fn chart_is_well_formed_with_labels_and_one_polyline_per_series() {
    let chart = Chart {
        title: "tok/s <&> \"quoted\"".into(),
        x_label: "concurrency (requests in flight)".into(),
        y_label: "output_tok_s (tok/s), median".into(),
        x_scale: Scale::Log2,
        markers: true,
        series: vec![
            Series {
                label: "server A & co".into(),
                points: vec![(1.0, 10.0), (2.0, 25.0), (8.0, 60.0), (32.0, 55.0)],
            },
            Series {
                label: "server B".into(),
                points: vec![(1.0, 5.0), (4.0, 30.0), (32.0, 90.0)],
            },
        ],
    };
    let svg = render(&chart);
    let names = check_well_formed(&svg);
    assert_eq!(names.iter().filter(|n| *n == "polyline").count(), 2);
    assert_eq!(names.iter().filter(|n| *n == "circle").count(), 7);
    assert!(svg.contains(">concurrency (requests in flight)</text>"), "{svg}");
    assert!(svg.contains(">output_tok_s (tok/s), median</text>"), "{svg}");
    assert!(svg.contains("tok/s &lt;&amp;&gt; &quot;quoted&quot;"), "{svg}");
    // Legend entries name each series.
    assert!(
        svg.contains(">server A &amp; co</text>") && svg.contains(">server B</text>"),
        "{svg}"
    );
    // Log2 ticks at powers of two covering 1..32.
    for t in ["1", "2", "4", "8", "16", "32"] {
        assert!(
            svg.contains(&format!(r#"text-anchor="middle">{t}</text>"#)),
            "tick {t}: {svg}"
        );
    }
    let lines = polylines(&svg);
    assert_eq!(lines[0].0, "server A &amp; co");
    for (series, (_, px)) in chart.series.iter().zip(&lines) {
        assert_monotone(&series.points, px);
    }
    // Equal ratios of x are equal pixel steps on a log2 axis (1->2 and 2->4
    // would differ on a linear one): 1, 4, 32 in series B are 0, 2, 5 octaves.
    let b = &lines[1].1;
    let octave = (b[1].0 - b[0].0) / 2.0;
    assert!(((b[2].0 - b[1].0) - 3.0 * octave).abs() < 0.2, "{b:?}");
}

#[test]
fn capsules_yield_throughput_and_latency_charts_one_series_per_capsule() {
    let caps = [sweep_capsule("old.json", 1.0), sweep_capsule("new.json", 1.2)];
    let all = plots(&caps);
    let names: Vec<&str> = all.iter().map(|p| p.file_name.as_str()).collect();
    assert_eq!(
        names,
        [
            "output_tok_s-vs-concurrency.svg",
            "cdf-ttft_ms-c_1.svg",
            "cdf-ttft_ms-c_4.svg",
            "cdf-ttft_ms-c_16.svg",
            "cdf-ttft_ms-c_64.svg"
        ]
    );
    let tput = &all[0];
    assert_eq!(tput.chart.x_scale, Scale::Log2);
    assert_eq!(tput.chart.series.len(), 2);
    assert_eq!(tput.chart.series[1].label, "new");
    assert_eq!(
        tput.chart.series[0].points,
        [(1.0, 90.0), (4.0, 330.0), (16.0, 1100.0), (64.0, 2600.0)]
    );
    let svg = render(&tput.chart);
    check_well_formed(&svg);
    let lines = polylines(&svg);
    assert_eq!(lines.len(), 2);
    for (series, (_, px)) in tput.chart.series.iter().zip(&lines) {
        assert_monotone(&series.points, px);
    }
    // The faster capsule's line lies above (smaller pixel y) at every concurrency.
    for (a, b) in lines[0].1.iter().zip(&lines[1].1) {
        assert!(b.1 < a.1, "{a:?} vs {b:?}");
    }

    let cdf = &all[4];
    assert_eq!(cdf.chart.series.len(), 2);
    let svg = render(&cdf.chart);
    let names = check_well_formed(&svg);
    assert_eq!(names.iter().filter(|n| *n == "polyline").count(), 2);
    assert!(svg.contains(">ttft_ms (ms)</text>") && svg.contains(">fraction of samples at or below</text>"));
    for (series, (_, px)) in cdf.chart.series.iter().zip(polylines(&svg)) {
        assert_eq!(series.points.len(), px.len());
        // A CDF: x and y never decrease along the curve, so neither do the pixels' x
        // nor rise the pixels' y.
        for w in px.windows(2) {
            assert!(w[1].0 >= w[0].0 && w[1].1 <= w[0].1, "{w:?}");
        }
    }
}

#[test]
fn ecdf_steps_through_every_sample_and_ends_at_one() {
    let pts = ecdf_points(&[3.0, 1.0, 2.0, f64::NAN]);
    assert_eq!(
        pts,
        [
            (1.0, 0.0),
            (1.0, 1.0 / 3.0),
            (2.0, 1.0 / 3.0),
            (2.0, 2.0 / 3.0),
            (3.0, 2.0 / 3.0),
            (3.0, 1.0)
        ]
    );
    let many: Vec<f64> = (0..10_000).map(|i| i as f64).collect();
    let pts = ecdf_points(&many);
    assert_eq!(pts.len(), 401);
    assert_eq!(pts[0].0, 0.0);
    assert_eq!(pts[400], (9999.0, 1.0));
    assert!(ecdf_points(&[]).is_empty());
}

#[test]
fn no_plot_files_without_sweeps_or_latencies() {
    let old = Capsule::read(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benchmarks/2026-11-22-bench-cpu-2core.json"
    )))
    .expect("benchmarks/ capsule reads");
    // A bench capsule's few ttft samples and ns timings are no distribution to draw.
    let few = Capsule::from_json(
        "few.json",
        &json!({"result": {"kind": "bench", "rows": [
            Row::new("pp512", "ttft_ms", "ms", Better::Lower, vec![5.0, 5.1, 5.2]),
            Row::new("detok", "stream_ns_per_token", "ns", Better::Lower, (0..50).map(f64::from).collect()),
        ]}}),
    )
    .expect("capsule");
    assert!(plots(&[old.clone(), few]).is_empty());
    let dir = std::env::temp_dir().join(format!("kestrel-report-plot-{}", std::process::id()));
    let written = write_plots(&[old], &dir).expect("nothing to write is fine");
    assert!(written.is_empty());
    assert!(!dir.exists(), "no directory for no plots");

    let written = write_plots(&[sweep_capsule("s.json", 1.0)], &dir).expect("plots written");
    assert_eq!(written.len(), 5);
    for p in &written {
        let text = std::fs::read_to_string(p).expect("plot readable");
        check_well_formed(&text);
    }
    std::fs::remove_dir_all(&dir).expect("temp dir removed");
}
