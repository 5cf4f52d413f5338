//! A small hand-written SVG line chart: panels stacked over one shared time axis, each with
//! its own y axis (linear or log10) and legend. No dependencies; the output is a plain SVG 1.1
//! document any browser shows.

use std::fmt::Write as _;

/// One line: (x, y) points in x order. Points with a non-finite y (or y ≤ 0 on a log axis)
/// break the line.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel {
    pub title: String,
    /// The y axis' unit, shown next to the title.
    pub unit: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

/// Colours for up to eight series (Okabe–Ito, readable by colour-blind readers).
pub const COLORS: [&str; 8] =
    ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];

const W: f64 = 980.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 190.0;
const PANEL_H: f64 = 210.0;
const PANEL_GAP: f64 = 58.0;
const TOP: f64 = 64.0;

/// XML-escapes text.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// `1234` → `1.23k`, `2500000` → `2.5M`; small values keep up to 3 significant digits.
pub fn compact(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if (x == x.trunc() && x.abs() < 1e4) || x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    };
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    format!("{s}{suffix}")
}

/// Round tick positions covering [lo, hi] (about five of them).
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let e = raw.log10().floor();
    let f = raw / 10f64.powf(e);
    let nf = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    let step = nf * 10f64.powf(e);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 && out.len() < 50 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// Renders the chart. `x_label` names the shared x axis (e.g. "seconds since the traffic
/// started").
pub fn render(title: &str, subtitle: &[String], x_label: &str, panels: &[Panel]) -> String {
    let sub_h = 16.0 * subtitle.len() as f64;
    let top = TOP + sub_h;
    let h = top + panels.len() as f64 * (PANEL_H + PANEL_GAP) + 10.0;
    let plot_w = W - LEFT - RIGHT;
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in panels {
        for s in &p.series {
            for &(x, _) in &s.points {
                if x.is_finite() {
                    x0 = x0.min(x);
                    x1 = x1.max(x);
                }
            }
        }
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    x0 = x0.min(0.0);
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * plot_w;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h:.0}" viewBox="0 0 {W} {h:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(o, r#"<text x="{LEFT}" y="26" font-size="17" font-weight="bold">{}</text>"#, esc(title));
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(
            o,
            r##"<text x="{LEFT}" y="{:.0}" fill="#444">{}</text>"##,
            46.0 + 16.0 * i as f64,
            esc(line)
        );
    }
    for (pi, p) in panels.iter().enumerate() {
        let py = top + pi as f64 * (PANEL_H + PANEL_GAP);
        let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
        for s in &p.series {
            for &(_, y) in &s.points {
                if y.is_finite() && (!p.log_y || y > 0.0) {
                    y0 = y0.min(y);
                    y1 = y1.max(y);
                }
            }
        }
        let (lo, hi, ticks): (f64, f64, Vec<f64>) = if p.log_y {
            if !y0.is_finite() {
                (y0, y1) = (1.0, 10.0);
            }
            let lo = y0.log10().floor();
            let hi = y1.log10().ceil().max(lo + 1.0);
            let ticks = (lo as i32..=hi as i32).map(|e| e as f64).collect();
            (lo, hi, ticks)
        } else {
            if !y0.is_finite() {
                (y0, y1) = (0.0, 1.0);
            }
            let lo = y0.min(0.0);
            let mut hi = y1 * 1.08;
            if hi <= lo {
                hi = lo + 1.0;
            }
            let ticks = nice_ticks(lo, hi);
            let hi = ticks.last().copied().unwrap_or(hi).max(hi);
            (lo, hi, ticks)
        };
        let sy = |y: f64| {
            let v = if p.log_y { y.log10() } else { y };
            py + PANEL_H - (v - lo) / (hi - lo) * PANEL_H
        };
        let unit = if p.unit.is_empty() { String::new() } else { format!(" ({})", p.unit) };
        let _ = writeln!(
            o,
            r#"<text x="{LEFT}" y="{:.0}" font-size="14" font-weight="bold">{}{}</text>"#,
            py - 10.0,
            esc(&p.title),
            esc(&unit)
        );
        let _ = writeln!(
            o,
            r##"<rect x="{LEFT}" y="{py:.1}" width="{plot_w:.1}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
        );
        for t in &ticks {
            let y = if p.log_y { py + PANEL_H - (t - lo) / (hi - lo) * PANEL_H } else { sy(*t) };
            let label = if p.log_y { compact(10f64.powf(*t)) } else { compact(*t) };
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y + 4.0,
                esc(&label)
            );
        }
        for t in nice_ticks(x0, x1) {
            let x = sx(t);
            let _ = writeln!(
                o,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{py:.1}" y2="{:.1}" stroke="#eeeeee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
                py + PANEL_H,
                py + PANEL_H + 15.0,
                esc(&compact(t))
            );
        }
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            LEFT + plot_w / 2.0,
            py + PANEL_H + 31.0,
            esc(x_label)
        );
        for (si, s) in p.series.iter().enumerate() {
            // Lines, broken where a point is missing.
            let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for &(x, y) in &s.points {
                if x.is_finite() && y.is_finite() && (!p.log_y || y > 0.0) {
                    runs.last_mut().expect("one run").push((sx(x), sy(y)));
                } else if !runs.last().expect("one run").is_empty() {
                    runs.push(Vec::new());
                }
            }
            for run in runs.iter().filter(|r| !r.is_empty()) {
                if run.len() == 1 {
                    let _ = writeln!(
                        o,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#,
                        run[0].0, run[0].1, s.color
                    );
                } else {
                    let pts: Vec<String> = run.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                    let _ = writeln!(
                        o,
                        r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                        s.color,
                        pts.join(" ")
                    );
                }
            }
            let ly = py + 14.0 + 18.0 * si as f64;
            let lx = LEFT + plot_w + 14.0;
            let _ = writeln!(
                o,
                r#"<line x1="{lx:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
                lx + 18.0,
                ly - 4.0,
                ly - 4.0,
                s.color,
                lx + 24.0,
                esc(&s.name)
            );
        }
    }
    o.push_str("</svg>\n");
    o
}

/// A per-second series as points at the middle of each second.
pub fn per_second(values: &[f64]) -> Vec<(f64, f64)> {
    values.iter().enumerate().map(|(i, v)| (i as f64 + 0.5, *v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_numbers() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(5.0), "5");
        assert_eq!(compact(0.25), "0.25");
        assert_eq!(compact(1500.0), "1500");
        assert_eq!(compact(25_000.0), "25k");
        assert_eq!(compact(1_234_567.0), "1.23M");
        assert_eq!(compact(100.0), "100");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = nice_ticks(0.0, 137_000.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!(t.len() >= 4 && t.len() <= 8, "{t:?}");
    }

    #[test]
    fn renders_a_well_formed_document() {
        let panels = vec![
            Panel {
                title: "Throughput <per second>".into(),
                unit: "msg/s".into(),
                log_y: false,
                series: vec![Series {
                    name: "sent & delivered".into(),
                    color: COLORS[0],
                    points: per_second(&[1.0, 3.0, 2.0]),
                }],
            },
            Panel {
                title: "Latency".into(),
                unit: "ms".into(),
                log_y: true,
                series: vec![
                    Series {
                        name: "p50".into(),
                        color: COLORS[1],
                        points: vec![(0.5, 0.2), (1.5, f64::NAN), (2.5, 3.0)],
                    },
                    Series { name: "empty".into(), color: COLORS[2], points: vec![] },
                ],
            },
        ];
        let s = render("A & B", &["line".into()], "seconds", &panels);
        assert!(s.starts_with("<svg ") && s.ends_with("</svg>\n"));
        assert!(
            s.contains("A &amp; B") && s.contains("&lt;per second&gt;") && s.contains("sent &amp; delivered")
        );
        assert_eq!(s.matches("<polyline").count(), 1, "{s}");
        // The NaN breaks the p50 line into two single points.
        assert_eq!(s.matches("<circle").count(), 2, "{s}");
        assert!(!s.contains("NaN") && !s.contains("inf"), "{s}");
        // Every element that opens closes (no nesting besides the root).
        assert_eq!(s.matches("<svg").count(), 1);
        assert_eq!(s.matches("<text").count(), s.matches("</text>").count());
    }
}
