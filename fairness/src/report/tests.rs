//! Tests of the report: sections, escaping of data-derived text, and every chart's title and axes.

use super::*;
use crate::results::utkface_group_labels;

fn study() -> StudyResults {
    let mut rounds = Vec::new();
    for r in 1..=3u32 {
        let mut c = GroupCounts::new();
        for i in 0..400u32 {
            let race = (i % 5).to_string();
            let gender = ((i / 5) % 2).to_string();
            let label = i % 3 == 0;
            // Race 4 is served worse early on; everyone improves.
            let wrong_every = if race == "4" { 2 + r } else { 4 + 2 * r };
            let pred = if i % wrong_every == 0 { !label } else { label };
            c.record(&[("race", &race), ("gender", &gender)], label, pred)
                .unwrap();
        }
        rounds.push(RoundResult {
            round: r,
            strategy: "fairfed".into(),
            participants: vec!["hospital-a".into(), "hospital-b".into()],
            loss: Some(1.0 / f64::from(r)),
            counts: c,
            epsilon: [
                ("hospital-a".to_string(), 0.4 * f64::from(r)),
                ("hospital-b".to_string(), 0.5 * f64::from(r)),
            ]
            .into(),
            weights: [
                ("hospital-a".to_string(), 0.5 + 0.05 * f64::from(r)),
                ("hospital-b".to_string(), 0.5 - 0.05 * f64::from(r)),
            ]
            .into(),
            ..Default::default()
        });
    }
    let mut config = serde_json::json!({
        "name": "demo <study>",
        "fairness": {"maxDemographicParityDifference": 0.1, "maxEqualizedOddsDifference": 0.15}
    });
    config["group_labels"] = serde_json::to_value(utkface_group_labels()).unwrap();
    StudyResults { config, rounds }
}

fn render(results: &StudyResults) -> String {
    render_html(results, &ReportOptions { min_group_size: None }).unwrap()
}

/// The `<main>` element parsed as XML: the report keeps its body well-formed, so a stray tag from the
/// data would show up as an element here.
fn parse_main(html: &str) -> roxmltree::Document<'_> {
    let start = html.find("<main>").expect("<main>");
    let end = html.find("</main>").expect("</main>") + "</main>".len();
    roxmltree::Document::parse(&html[start..end]).expect("the report's body is well-formed")
}

fn text(node: roxmltree::Node) -> String {
    node.descendants()
        .filter(roxmltree::Node::is_text)
        .filter_map(|n| n.text())
        .collect::<String>()
        .trim()
        .to_string()
}

/// Checks that every chart has a non-empty `<title>` as its first element and a non-empty x and y
/// axis label (`class="… axis-label"`, `data-axis="x"` / `"y"`); returns the number of charts.
fn check_charts(html: &str) -> usize {
    let doc = parse_main(html);
    let charts: Vec<_> = doc.descendants().filter(|n| n.has_tag_name("svg")).collect();
    for svg in &charts {
        let first = svg.first_element_child().expect("a chart has content");
        assert!(
            first.has_tag_name("title") && !text(first).is_empty(),
            "a chart's first element is its <title>: {:?}",
            svg.range()
        );
        let name = text(first);
        for axis in ["x", "y"] {
            let labels: Vec<String> = svg
                .descendants()
                .filter(|n| {
                    n.attribute("class")
                        .is_some_and(|c| c.split(' ').any(|c| c == "axis-label"))
                        && n.attribute("data-axis") == Some(axis)
                })
                .map(text)
                .collect();
            assert!(
                labels.len() == 1 && !labels[0].is_empty(),
                "chart {name:?} has one {axis} axis label: {labels:?}"
            );
        }
    }
    charts.len()
}

#[test]
fn renders_all_sections() {
    let html = render(&study());
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("demo &#60;study&#62;"), "title is escaped");
    assert!(!html.contains("<study>"));
    assert!(
        html.matches("<svg").count() >= 6,
        "rounds×2, groups×3, ε, weights"
    );
    for text in [
        "Privacy budget ε by round",
        "Gender × Race (intersectional groups)",
        "Asian",
        "Limit: equalized odds",
        "How much each hospital counted",
        "Round by round",
        "Study configuration",
    ] {
        assert!(html.contains(text), "missing {text:?}");
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(!html.contains("<script"));
}

#[test]
fn every_chart_has_a_title_and_axis_labels() {
    let html = render(&study());
    // Accuracy and gaps by round, race, gender and gender × race, ε, weights.
    assert_eq!(check_charts(&html), 7);
    let bare = StudyResults {
        config: serde_json::json!({}),
        rounds: vec![RoundResult {
            round: 1,
            ..Default::default()
        }],
    };
    let html = render(&bare);
    assert_eq!(check_charts(&html), 1, "only accuracy by round");
    assert!(html.contains("No sensitive attributes were recorded."));
    assert!(html.contains("did not record a differential-privacy budget"));
}

#[test]
fn data_derived_text_is_escaped() {
    let evil = "<script>alert(\"x\")</script>";
    let mut results = study();
    results.config["group_labels"]["race"]["2"] = evil.into();
    results.config["strategy"] = evil.into();
    let last = results.rounds.last_mut().unwrap();
    last.strategy = evil.into();
    last.participants.push(evil.into());
    last.epsilon.insert(evil.into(), 1.0);
    // A raw group value (no label) and an attribute name straight from the data.
    last.counts
        .record(&[("race", "<b>bold</b>"), ("<i>site</i>", "x")], true, true)
        .unwrap();
    let html = render(&results);
    assert!(!html.contains("<script") && !html.contains("<b>bold") && !html.contains("<i>"));
    assert!(html.contains("&#60;script&#62;"));
    let doc = parse_main(&html);
    for tag in ["script", "i"] {
        assert!(
            !doc.descendants().any(|n| n.has_tag_name(tag)),
            "a <{tag}> element came from the data"
        );
    }
    assert!(
        doc.descendants()
            .filter(|n| n.has_tag_name("td"))
            .any(|n| text(n) == evil),
        "the group's name is shown as text"
    );
    assert!(
        doc.descendants()
            .filter(|n| n.has_tag_name("title"))
            .any(|n| text(n).starts_with(evil)),
        "and as a chart's tooltip"
    );
    check_charts(&html);
}

#[test]
fn thresholds_are_found_in_any_spelling() {
    let t = thresholds_from_config(&serde_json::json!({"spec": {"fairness": {
        "max_demographic_parity_difference": 0.2, "maxEOD": 0.3}}}));
    assert_eq!(t.max_demographic_parity_difference, Some(0.2));
    assert_eq!(t.max_equalized_odds_difference, Some(0.3));
}

#[test]
fn bad_input_is_a_clear_error() {
    let r = StudyResults {
        config: serde_json::json!({}),
        rounds: vec![],
    };
    assert!(matches!(
        render_html(&r, &ReportOptions { min_group_size: None }),
        Err(ReportError::NoRounds)
    ));
    let mut r = study();
    r.config["group_labels"] = serde_json::json!({"race": ["White"]});
    let err = render_html(&r, &ReportOptions { min_group_size: None }).unwrap_err();
    assert!(matches!(err, ReportError::Config(_)));
    assert!(err.to_string().contains("group_labels"), "{err}");
}

/// Development aid: `DUMP_REPORT=FILE cargo test -p caduceus-fairness dump_report` writes the test
/// study's report to FILE to look at it.
#[test]
fn dump_report() {
    if let Some(path) = std::env::var_os("DUMP_REPORT") {
        std::fs::write(path, render(&study())).unwrap();
    }
}
