//! The bias report: one self-contained HTML file with inline SVG charts, no scripts and no network
//! fetches, written for a clinician as much as for an engineer.
//!
//! This module turns a study's results into the page's data ([`page`]), lays out its charts
//! ([`svg`]) and renders both with the askama templates in `fairness/templates/`, which escape every
//! string taken from the data.

mod page;
mod svg;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use askama::Template;
use serde_json::Value;

use crate::counts::{GroupCounts, INTERSECTION_SEP};
use crate::metrics::{AttributeMetrics, DEFAULT_MIN_GROUP_SIZE, FairnessMetrics};
use crate::results::{GroupLabels, RoundResult, StudyResults};
use crate::verdict::{FairnessThresholds, Outcome, verdict};
use page::{AttributeSection, Glance, GlanceAttribute, GroupRow, Privacy, ReportPage, RoundRow};
use svg::{Axis, GroupBars, LineChart, LineSpec, Series};

/// Options of the report.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Minimum group size; `None` takes `min_group_size` from the configuration, else the default.
    pub min_group_size: Option<u64>,
}

/// Why a report could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the study has no finished rounds yet, so there is nothing to report")]
    NoRounds,
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot render the report template: {0}")]
    Render(#[from] askama::Error),
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{:.1}%", x * 100.0))
}

fn gap(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.3}"))
}

/// Finds a number anywhere in the configuration under any of `names` (compared ignoring case, `_`
/// and `-`).
fn find_number(v: &Value, names: &[&str]) -> Option<f64> {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                if names.iter().any(|n| norm(k) == norm(n))
                    && let Some(x) = val.as_f64()
                {
                    return Some(x);
                }
            }
            m.values().find_map(|val| find_number(val, names))
        }
        Value::Array(a) => a.iter().find_map(|val| find_number(val, names)),
        _ => None,
    }
}

/// The fairness thresholds written anywhere in the configuration (`maxDemographicParityDifference` /
/// `max_demographic_parity_difference` / `maxDPD`, and the same for equalized odds).
#[must_use]
pub fn thresholds_from_config(config: &Value) -> FairnessThresholds {
    FairnessThresholds {
        max_demographic_parity_difference: find_number(
            config,
            &["max_demographic_parity_difference", "max_dpd"],
        ),
        max_equalized_odds_difference: find_number(config, &["max_equalized_odds_difference", "max_eod"]),
    }
}

struct Labels<'a>(&'a GroupLabels);

impl Labels<'_> {
    fn attribute(key: &str) -> String {
        key.split(INTERSECTION_SEP)
            .map(|a| {
                let mut c = a.chars();
                match c.next() {
                    Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                    None => String::new(),
                }
            })
            .collect::<Vec<_>>()
            .join(" × ")
    }

    /// Human name of one group, one line per attribute of an intersection.
    fn group(&self, attr_key: &str, value: &str) -> Vec<String> {
        let attrs: Vec<&str> = attr_key.split(INTERSECTION_SEP).collect();
        let values: Vec<&str> = value.split(INTERSECTION_SEP).collect();
        if attrs.len() != values.len() {
            return vec![value.to_string()];
        }
        attrs
            .iter()
            .zip(&values)
            .map(|(a, v)| {
                self.0
                    .get(*a)
                    .and_then(|m| m.get(*v))
                    .cloned()
                    .unwrap_or_else(|| {
                        if attrs.len() > 1 {
                            format!("{a} {v}")
                        } else {
                            (*v).to_string()
                        }
                    })
            })
            .collect()
    }
}

/// Renders the whole report.
///
/// # Errors
///
/// [`ReportError::NoRounds`] when the study has no finished round, [`ReportError::Config`] when its
/// `group_labels` are malformed.
pub fn render_html(results: &StudyResults, opts: &ReportOptions) -> Result<String, ReportError> {
    Ok(build_page(results, opts)?.render()?)
}

/// A value per round, `None` where that round has none.
type ByRound = Vec<(f64, Option<f64>)>;
/// A per-hospital figure of a round: ε or aggregation weights.
type PerHospital = fn(&RoundResult) -> &BTreeMap<String, f64>;

/// The study's results with the metrics of every round, from which the page is built.
struct Study<'a> {
    results: &'a StudyResults,
    labels: Labels<'a>,
    thresholds: FairnessThresholds,
    per_round: Vec<FairnessMetrics>,
    rounds_x: Vec<f64>,
}

impl Study<'_> {
    fn final_metrics(&self) -> &FairnessMetrics {
        self.per_round.last().expect("a study with rounds")
    }

    /// The attributes of the final round: single ones (race, gender) first, then intersections.
    fn attributes(&self, intersections: bool) -> impl Iterator<Item = &String> {
        self.final_metrics()
            .attributes
            .keys()
            .filter(move |k| GroupCounts::is_intersection(k) == intersections)
    }

    fn by_round(&self, get: &dyn Fn(&RoundResult) -> Option<f64>) -> ByRound {
        let values = self.results.rounds.iter().map(get);
        self.rounds_x.iter().copied().zip(values).collect()
    }

    fn metric_by_round(&self, attr: &str, get: fn(&AttributeMetrics) -> Option<f64>) -> ByRound {
        let values = self
            .per_round
            .iter()
            .map(|m| m.attributes.get(attr).and_then(get));
        self.rounds_x.iter().copied().zip(values).collect()
    }

    fn glance(&self) -> Glance {
        let last = self.results.rounds.last().expect("a study with rounds");
        let final_metrics = self.final_metrics();
        let v = verdict(&self.thresholds, &final_metrics.attributes);
        let (verdict_class, verdict_head) = match v.outcome {
            Outcome::Pass => ("pass", "Within the study's fairness limits"),
            Outcome::Fail => ("fail", "Outside the study's fairness limits"),
            Outcome::Undetermined => ("unknown", "Fairness verdict not available"),
        };
        Glance {
            rounds: last.round,
            across: match last.participants.len().max(last.weights.len()) {
                0 => String::new(),
                1 => " at 1 hospital".to_string(),
                n => format!(" across {n} hospitals"),
            },
            accuracy: pct(round_accuracy(last)),
            verdict_class,
            verdict_head,
            verdict_message: v.message,
            attributes: self
                .attributes(false)
                .map(|a| {
                    let m = &final_metrics.attributes[a];
                    GlanceAttribute {
                        name: Labels::attribute(a),
                        worst_group: m
                            .worst_group
                            .as_ref()
                            .map_or_else(|| "n/a".into(), |g| self.labels.group(a, g).join(", ")),
                        worst_accuracy: pct(m.worst_group_accuracy),
                        dpd: gap(m.demographic_parity_difference),
                        eod: gap(m.equalized_odds_difference),
                    }
                })
                .collect(),
        }
    }

    fn accuracy_chart(&self) -> LineChart {
        let mut series = vec![Series {
            name: "Overall accuracy".into(),
            color: svg::BLACK,
            points: self.by_round(&round_accuracy),
            dashed: false,
        }];
        if self.results.rounds.iter().any(|r| r.test_accuracy.is_some()) {
            series.push(Series {
                name: "Held-out test accuracy".into(),
                color: svg::GREY,
                points: self.by_round(&|r| r.test_accuracy),
                dashed: false,
            });
        }
        for (ai, a) in self.attributes(false).enumerate() {
            series.push(Series {
                name: format!("Worst {} group", Labels::attribute(a).to_lowercase()),
                color: ai,
                points: self.metric_by_round(a, |m| m.worst_group_accuracy),
                dashed: true,
            });
        }
        svg::line_chart(&LineSpec {
            title: "Accuracy by round",
            x_label: "Training round",
            y_label: "Accuracy",
            axis: Axis::Percent,
            series: &series,
            limits: &[],
        })
    }

    /// `None` when no sensitive attribute was recorded.
    fn gaps_chart(&self) -> Option<LineChart> {
        let mut series = Vec::new();
        for (ai, a) in self.attributes(false).enumerate() {
            series.push(Series {
                name: format!("{}, demographic parity", Labels::attribute(a)),
                color: ai,
                points: self.metric_by_round(a, |m| m.demographic_parity_difference),
                dashed: false,
            });
            series.push(Series {
                name: format!("{}, equalized odds", Labels::attribute(a)),
                color: ai,
                points: self.metric_by_round(a, |m| m.equalized_odds_difference),
                dashed: true,
            });
        }
        let t = &self.thresholds;
        let limits: Vec<(String, f64)> = [
            ("Limit: demographic parity", t.max_demographic_parity_difference),
            ("Limit: equalized odds", t.max_equalized_odds_difference),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name.to_string(), v?)))
        .collect();
        (!series.is_empty()).then(|| {
            svg::line_chart(&LineSpec {
                title: "Fairness gaps by round",
                x_label: "Training round",
                y_label: "Gap between groups",
                axis: Axis::Gap,
                series: &series,
                limits: &limits,
            })
        })
    }

    /// One line per hospital of a per-hospital figure; `None` when no round recorded it.
    fn per_hospital_chart(
        &self,
        title: &str,
        y_label: &str,
        axis: Axis,
        get: PerHospital,
    ) -> Option<LineChart> {
        let hospitals: BTreeSet<&String> = self.results.rounds.iter().flat_map(|r| get(r).keys()).collect();
        if hospitals.is_empty() {
            return None;
        }
        let series: Vec<Series> = hospitals
            .iter()
            .enumerate()
            .map(|(i, h)| Series {
                name: (*h).clone(),
                color: i,
                points: self.by_round(&|r| get(r).get(*h).copied()),
                dashed: false,
            })
            .collect();
        Some(svg::line_chart(&LineSpec {
            title,
            x_label: "Training round",
            y_label,
            axis,
            series: &series,
            limits: &[],
        }))
    }
}

/// What the report shows, computed from the study's results.
fn build_page(results: &StudyResults, opts: &ReportOptions) -> Result<ReportPage, ReportError> {
    let last = results.rounds.last().ok_or(ReportError::NoRounds)?;
    let group_labels = results.group_labels().map_err(ReportError::Config)?;
    let min_group_size = opts
        .min_group_size
        .or_else(|| {
            find_number(&results.config, &["min_group_size"])
                .filter(|x| *x >= 0.0)
                .map(|x| {
                    // A count written as a JSON number; absurd values saturate.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let n = x as u64;
                    n
                })
        })
        .unwrap_or(DEFAULT_MIN_GROUP_SIZE);
    let study = Study {
        results,
        labels: Labels(&group_labels),
        thresholds: thresholds_from_config(&results.config),
        per_round: results
            .rounds
            .iter()
            .map(|r| FairnessMetrics::from_counts(&r.counts, min_group_size))
            .collect(),
        rounds_x: results.rounds.iter().map(|r| f64::from(r.round)).collect(),
    };
    let title = results
        .config
        .get("name")
        .or_else(|| results.config.get("study"))
        .and_then(Value::as_str)
        .map_or_else(
            || "Fairness report".to_string(),
            |n| format!("Fairness report: {n}"),
        );
    let final_metrics = study.final_metrics();
    let attributes = study
        .attributes(false)
        .chain(study.attributes(true))
        .map(|a| attribute_section(a, &final_metrics.attributes[a], &study.labels))
        .collect();
    let privacy = study
        .per_hospital_chart(
            "Privacy budget ε by round",
            "ε (privacy loss)",
            Axis::Auto,
            |r| &r.epsilon,
        )
        .map(|chart| Privacy {
            delta: results
                .rounds
                .iter()
                .rev()
                .find_map(|r| r.delta)
                .map(|d| format!("{d:e}")),
            chart,
        });
    let weights_chart = study.per_hospital_chart(
        "Aggregation weight by round",
        "Share of the combined model",
        Axis::Percent,
        |r| &r.weights,
    );
    Ok(ReportPage {
        title,
        glance: study.glance(),
        min_group_size,
        accuracy_chart: study.accuracy_chart(),
        gaps_chart: study.gaps_chart(),
        final_round: last.round,
        attributes,
        privacy,
        weights_chart,
        rounds: results
            .rounds
            .iter()
            .map(|r| RoundRow {
                round: r.round,
                strategy: r.strategy.clone(),
                hospitals: r.participants.join(", "),
                accuracy: pct(round_accuracy(r)),
                loss: r.loss.map_or_else(|| "n/a".into(), |l| format!("{l:.4}")),
            })
            .collect(),
        config: serde_json::to_string_pretty(&results.config).unwrap_or_default(),
    })
}

fn attribute_section(attr: &str, m: &AttributeMetrics, labels: &Labels) -> AttributeSection {
    let heading = if GroupCounts::is_intersection(attr) {
        format!("{} (intersectional groups)", Labels::attribute(attr))
    } else {
        Labels::attribute(attr)
    };
    let bars: Vec<GroupBars> = m
        .groups
        .iter()
        .map(|(g, gm)| GroupBars {
            name_lines: labels.group(attr, g),
            count: gm.count,
            too_few: gm.insufficient_data,
            accuracy: gm.accuracy,
            tpr: gm.tpr,
            fpr: gm.fpr,
        })
        .collect();
    AttributeSection {
        chart: svg::bar_chart(&heading, &Labels::attribute(attr), &bars),
        heading,
        groups: m
            .groups
            .iter()
            .map(|(g, gm)| GroupRow {
                name: labels.group(attr, g).join(", "),
                count: gm.count,
                too_few: gm.insufficient_data,
                accuracy: pct(gm.accuracy),
                tpr: pct(gm.tpr),
                fpr: pct(gm.fpr),
                selection_rate: pct(gm.selection_rate),
            })
            .collect(),
        dpd: gap(m.demographic_parity_difference),
        dpr: gap(m.demographic_parity_ratio),
        eod: gap(m.equalized_odds_difference),
        eor: gap(m.equalized_odds_ratio),
    }
}

fn round_accuracy(r: &RoundResult) -> Option<f64> {
    r.accuracy.or_else(|| r.counts.overall.accuracy())
}
