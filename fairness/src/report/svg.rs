//! Chart layout for the report's inline SVG: scales, ticks, paths and legends as plain data that
//! `templates/charts.html` draws, every chart with a `<title>` and both axes labelled.

use std::fmt;

/// Okabe–Ito colours: distinguishable with the common forms of colour blindness.
const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#666666", "#000000",
];
/// Index of grey and black in [`PALETTE`], for the overall lines.
pub const GREY: usize = 6;
pub const BLACK: usize = 7;
const C_ACC: &str = "#0072B2";
const C_TPR: &str = "#009E73";
const C_FPR: &str = "#D55E00";

/// Width of a chart (bar charts with many groups grow wider).
const W: f64 = 900.0;
/// Margins of the plot area: left, right (the legend of line charts), top and bottom.
const ML: f64 = 64.0;
const MR: f64 = 250.0;
const MT: f64 = 36.0;
const MB: f64 = 52.0;

/// A coordinate or length, written with one decimal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Px(pub f64);

impl fmt::Display for Px {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}", self.0)
    }
}

/// One line of a line chart: a value per round, `None` where there is none.
pub struct Series {
    pub name: String,
    /// Index into the palette.
    pub color: usize,
    pub points: Vec<(f64, Option<f64>)>,
    pub dashed: bool,
}

/// The y axis of a line chart.
#[derive(Clone, Copy)]
pub enum Axis {
    /// 0..1 shown as 0%..100%.
    Percent,
    /// 0..max, at least 0..0.2, shown as decimals.
    Gap,
    /// 0..max, shown as decimals.
    Auto,
}

/// What a line chart shows; [`line_chart`] lays it out.
pub struct LineSpec<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub axis: Axis,
    pub series: &'a [Series],
    /// Horizontal limit lines: name and value.
    pub limits: &'a [(String, f64)],
}

/// Text at a position.
pub struct Label {
    pub x: Px,
    pub y: Px,
    pub text: String,
}

/// A horizontal grid line with its value at the left.
pub struct YTick {
    pub y: Px,
    pub label: Label,
}

/// A tick mark below the x axis with its value.
pub struct XTick {
    pub x: Px,
    pub label: Label,
}

/// The frame every chart shares: size, title, y grid, x axis line and the two axis labels.
pub struct Frame {
    pub width: Px,
    pub height: Px,
    /// The accessible name (`<title>`).
    pub title: String,
    /// The heading drawn in the chart.
    pub heading: Label,
    /// Left and right end of the plot area, and the y of the x axis.
    pub left: Px,
    pub right: Px,
    pub bottom: Px,
    pub y_ticks: Vec<YTick>,
    pub x_label: Label,
    /// Drawn rotated by -90° around its position.
    pub y_label: Label,
}

pub struct Point {
    pub x: Px,
    pub y: Px,
    pub tip: String,
}

pub struct Line {
    pub color: &'static str,
    pub dashed: bool,
    /// The path's `d`; empty when the series has no values.
    pub path: String,
    pub points: Vec<Point>,
    pub legend_x1: Px,
    pub legend_x2: Px,
    pub legend_y: Px,
    pub legend: Label,
}

pub struct Limit {
    pub y: Px,
    pub label: Label,
}

/// A laid-out line chart.
pub struct LineChart {
    pub frame: Frame,
    pub x_ticks: Vec<XTick>,
    /// The lower end of the x tick marks.
    pub tick_end: Px,
    pub limits: Vec<Limit>,
    pub lines: Vec<Line>,
}

/// A laid-out chart of accuracy, TPR and FPR per group.
pub struct BarChart {
    pub frame: Frame,
    pub legend: Vec<BarLegend>,
    pub groups: Vec<BarGroup>,
}

pub struct BarLegend {
    pub x: Px,
    pub color: &'static str,
    pub label: Label,
}

pub struct Bar {
    pub x: Px,
    pub y: Px,
    pub width: Px,
    pub height: Px,
    pub color: &'static str,
    pub opacity: f64,
    pub tip: String,
}

pub struct BarGroup {
    pub bars: Vec<Bar>,
    /// "n/a" where a rate has no value.
    pub missing: Vec<Label>,
    /// The group's name, one line per attribute.
    pub name_lines: Vec<Label>,
    /// Its size, and "too few" when it is too small.
    pub count: Label,
}

/// One group of a bar chart: name lines, size, and accuracy, TPR and FPR in 0..1.
pub struct GroupBars {
    pub name_lines: Vec<String>,
    pub count: u64,
    pub too_few: bool,
    pub accuracy: Option<f64>,
    pub tpr: Option<f64>,
    pub fpr: Option<f64>,
}

fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64, axis: Axis) -> String {
    if let Axis::Percent = axis {
        return format!("{:.0}%", v * 100.0);
    }
    let v = (v * 1e9).round() / 1e9;
    let whole = |x: f64| (x - x.round()).abs() < 1e-9;
    if whole(v) {
        format!("{v:.0}")
    } else if whole(v * 10.0) {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n.saturating_sub(1)).collect::<String>() + "…"
    }
}

fn label(x: f64, y: f64, text: impl Into<String>) -> Label {
    Label {
        x: Px(x),
        y: Px(y),
        text: text.into(),
    }
}

/// The frame of a chart `width` × `height` whose plot area spans `left..right` and `top..bottom`, with
/// y grid lines at `ticks` (value, label) for values in `0..=ymax`.
struct FrameSpec<'a> {
    title: String,
    heading: &'a str,
    width: f64,
    height: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    ymax: f64,
    ticks: Vec<(f64, String)>,
    x_label: &'a str,
    y_label: &'a str,
}

impl FrameSpec<'_> {
    fn y(&self, v: f64) -> f64 {
        self.bottom - (v / self.ymax).clamp(0.0, 1.0) * (self.bottom - self.top)
    }

    fn build(self) -> Frame {
        let y_ticks = self
            .ticks
            .iter()
            .map(|(v, text)| YTick {
                y: Px(self.y(*v)),
                label: label(self.left - 8.0, self.y(*v) + 4.0, text.clone()),
            })
            .collect();
        let mid = f64::midpoint(self.top, self.bottom);
        Frame {
            width: Px(self.width),
            height: Px(self.height),
            heading: label(ML, 22.0, self.heading),
            left: Px(self.left),
            right: Px(self.right),
            bottom: Px(self.bottom),
            y_ticks,
            x_label: label(
                f64::midpoint(self.left, self.right),
                self.height - 10.0,
                self.x_label,
            ),
            y_label: label(16.0, mid, self.y_label),
            title: self.title,
        }
    }
}

/// Lays out a line chart of values by round.
pub fn line_chart(spec: &LineSpec) -> LineChart {
    let height = 340.0;
    let (left, right, top, bottom) = (ML, W - MR, MT, height - MB);
    let xs = spec.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (mut x0, mut x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let value = |y: Option<f64>| y.filter(|y| y.is_finite());
    let ymax_data = spec
        .series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| value(p.1)))
        .chain(spec.limits.iter().map(|l| l.1))
        .fold(0.0f64, f64::max);
    let (ymax, step) = match spec.axis {
        Axis::Percent => (1.0, 0.2),
        Axis::Gap | Axis::Auto => {
            let floor = if let Axis::Gap = spec.axis { 0.2 } else { 1e-6 };
            let step = nice_step(ymax_data.max(floor), 5.0);
            ((ymax_data.max(floor) / step).ceil() * step, step)
        }
    };
    let mut ticks = Vec::new();
    let mut y = 0.0;
    while y <= ymax + step * 0.001 {
        ticks.push((y, fmt_tick(y, spec.axis)));
        y += step;
    }
    let frame = FrameSpec {
        title: spec.title.to_string(),
        heading: spec.title,
        width: W,
        height,
        left,
        right,
        top,
        bottom,
        ymax,
        ticks,
        x_label: spec.x_label,
        y_label: spec.y_label,
    };
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
    let sy = |y: f64| frame.y(y);

    // x ticks: integers, at most ~12
    let span = (x1 - x0).ceil().max(1.0);
    let xstep = (span / 12.0).ceil().max(1.0);
    let mut x_ticks = Vec::new();
    let mut x = x0.ceil();
    while x <= x1 + 1e-9 {
        x_ticks.push(XTick {
            x: Px(sx(x)),
            label: label(sx(x), bottom + 20.0, format!("{x:.0}")),
        });
        x += xstep;
    }
    let limits = spec
        .limits
        .iter()
        .map(|(name, v)| Limit {
            y: Px(sy(*v)),
            label: label(
                right - 4.0,
                sy(*v) - 5.0,
                format!("{name} ({})", fmt_tick(*v, Axis::Gap)),
            ),
        })
        .collect();
    let lines = spec
        .series
        .iter()
        .enumerate()
        .map(|(i, se)| series_line(se, i, spec.axis, &sx, &sy))
        .collect();
    LineChart {
        frame: frame.build(),
        x_ticks,
        tick_end: Px(bottom + 5.0),
        limits,
        lines,
    }
}

/// Where one series of a line chart goes: its path, points with tooltips and legend row `i`.
fn series_line(se: &Series, i: usize, axis: Axis, sx: &dyn Fn(f64) -> f64, sy: &dyn Fn(f64) -> f64) -> Line {
    let mut path = Vec::new();
    let mut pen_down = false;
    let mut points = Vec::new();
    for &(x, y) in &se.points {
        let Some(y) = y.filter(|y| y.is_finite()) else {
            pen_down = false;
            continue;
        };
        path.push(format!(
            "{}{} {}",
            if pen_down { "L" } else { "M" },
            Px(sx(x)),
            Px(sy(y))
        ));
        pen_down = true;
        let shown = match axis {
            Axis::Percent => format!("{:.1}%", y * 100.0),
            Axis::Gap | Axis::Auto => format!("{y:.3}"),
        };
        points.push(Point {
            x: Px(sx(x)),
            y: Px(sy(y)),
            tip: format!("{}, round {x:.0}: {shown}", se.name),
        });
    }
    #[allow(clippy::cast_precision_loss)] // a handful of legend rows
    let ly = MT + 6.0 + i as f64 * 20.0;
    let lx = W - MR + 16.0;
    Line {
        color: PALETTE[se.color % PALETTE.len()],
        dashed: se.dashed,
        path: path.join(" "),
        points,
        legend_x1: Px(lx),
        legend_x2: Px(lx + 22.0),
        legend_y: Px(ly),
        legend: label(lx + 28.0, ly + 4.0, truncate(&se.name, 34)),
    }
}

/// Lays out a bar chart of accuracy, TPR and FPR for each group of one attribute.
#[allow(clippy::cast_precision_loss)] // group and line counts are small
pub fn bar_chart(title: &str, x_label: &str, groups: &[GroupBars]) -> BarChart {
    let n = groups.len().max(1) as f64;
    let lines = groups.iter().map(|g| g.name_lines.len()).max().unwrap_or(1) as f64;
    let slot = ((W - ML - 30.0) / n).clamp(48.0, 150.0);
    let width = (ML + 30.0 + slot * n).max(W);
    let (top, plot_h) = (40.0, 220.0);
    let bottom = top + plot_h;
    // Name lines, the size line and the axis label.
    let height = bottom + 30.0 + 15.0 * (lines + 1.0) + 18.0;
    let heading = "Accuracy, TPR and FPR per group";
    let frame = FrameSpec {
        title: format!("{heading}: {title}"),
        heading,
        width,
        height,
        left: ML,
        right: width - 10.0,
        top,
        bottom,
        ymax: 1.0,
        ticks: (0..=5u8)
            .map(|k| {
                let y = f64::from(k) * 0.2;
                (y, fmt_tick(y, Axis::Percent))
            })
            .collect(),
        x_label,
        y_label: "Rate (accuracy, TPR, FPR)",
    };
    let legend = [("Accuracy", C_ACC), ("TPR", C_TPR), ("FPR", C_FPR)]
        .iter()
        .enumerate()
        .map(|(i, (name, color))| {
            let x = width - 300.0 + i as f64 * 95.0;
            BarLegend {
                x: Px(x),
                color,
                label: label(x + 19.0, 24.0, *name),
            }
        })
        .collect();
    let bw = ((slot - 16.0) / 3.0).min(30.0);
    let groups = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let cx = ML + 15.0 + slot * (i as f64 + 0.5);
            let x_start = cx - 1.5 * bw;
            let opacity = if g.too_few { 0.3 } else { 1.0 };
            let name = g.name_lines.join(", ");
            let mut bars = Vec::new();
            let mut missing = Vec::new();
            for (j, (v, color, metric)) in [
                (g.accuracy, C_ACC, "accuracy"),
                (g.tpr, C_TPR, "TPR"),
                (g.fpr, C_FPR, "FPR"),
            ]
            .into_iter()
            .enumerate()
            {
                let x = x_start + j as f64 * bw;
                match v.filter(|v| v.is_finite()) {
                    Some(v) => bars.push(Bar {
                        x: Px(x),
                        y: Px(frame.y(v)),
                        width: Px(bw - 2.0),
                        height: Px((bottom - frame.y(v)).max(0.5)),
                        color,
                        opacity,
                        tip: format!("{name}: {metric} {:.1}%", v * 100.0),
                    }),
                    None => missing.push(label(x + bw / 2.0 - 1.0, bottom - 4.0, "n/a")),
                }
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // slot is 48..150
            let max_chars = (slot / 7.0) as usize + 2;
            let name_lines: Vec<Label> = g
                .name_lines
                .iter()
                .enumerate()
                .map(|(k, part)| label(cx, bottom + 16.0 + 15.0 * k as f64, truncate(part, max_chars)))
                .collect();
            let count = label(
                cx,
                bottom + 16.0 + 15.0 * name_lines.len() as f64,
                format!("n={}{}", g.count, if g.too_few { ", too few" } else { "" }),
            );
            BarGroup {
                bars,
                missing,
                name_lines,
                count,
            }
        })
        .collect();
    BarChart {
        frame: frame.build(),
        legend,
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert!((nice_step(0.34, 5.0) - 0.1).abs() < 1e-12);
        assert!((nice_step(7.0, 5.0) - 2.0).abs() < 1e-12);
        assert_eq!(fmt_tick(0.15, Axis::Gap), "0.15");
        assert_eq!(fmt_tick(0.4, Axis::Percent), "40%");
        assert_eq!(fmt_tick(2.0, Axis::Auto), "2");
    }

    #[test]
    fn missing_and_non_finite_values_break_the_line() {
        let series = [Series {
            name: "s".into(),
            color: 0,
            points: vec![
                (1.0, Some(0.5)),
                (2.0, None),
                (3.0, Some(f64::NAN)),
                (4.0, Some(0.7)),
            ],
            dashed: false,
        }];
        let c = line_chart(&LineSpec {
            title: "t",
            x_label: "x",
            y_label: "y",
            axis: Axis::Percent,
            series: &series,
            limits: &[],
        });
        assert_eq!(c.lines[0].points.len(), 2);
        assert_eq!(c.lines[0].path.matches('M').count(), 2, "{}", c.lines[0].path);
        assert!(!c.lines[0].path.contains("NaN"));
        assert_eq!(c.x_ticks.len(), 4);
    }

    #[test]
    fn long_names_are_truncated() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
