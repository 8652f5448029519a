//! The report page as data: what `templates/report.html` shows, every string still unescaped
//! (askama escapes them when it renders).

use askama::Template;

use super::svg::{BarChart, LineChart};

/// The whole report.
#[derive(Template)]
#[template(path = "report.html")]
pub struct ReportPage {
    pub title: String,
    pub glance: Glance,
    pub min_group_size: u64,
    pub accuracy_chart: LineChart,
    /// `None` when no sensitive attribute was recorded.
    pub gaps_chart: Option<LineChart>,
    pub final_round: u32,
    pub attributes: Vec<AttributeSection>,
    /// `None` when the study recorded no ε.
    pub privacy: Option<Privacy>,
    /// `None` when the study recorded no aggregation weights.
    pub weights_chart: Option<LineChart>,
    pub rounds: Vec<RoundRow>,
    /// The configuration as pretty-printed JSON.
    pub config: String,
}

/// The summary at the top.
pub struct Glance {
    pub rounds: u32,
    /// " across N hospitals", " at 1 hospital" or nothing.
    pub across: String,
    pub accuracy: String,
    /// `pass`, `fail` or `unknown` (a CSS class).
    pub verdict_class: &'static str,
    pub verdict_head: &'static str,
    pub verdict_message: String,
    pub attributes: Vec<GlanceAttribute>,
}

/// One sensitive attribute in the summary.
pub struct GlanceAttribute {
    pub name: String,
    pub worst_group: String,
    pub worst_accuracy: String,
    pub dpd: String,
    pub eod: String,
}

/// The final model's chart and table for one attribute (or intersection of attributes).
pub struct AttributeSection {
    pub heading: String,
    pub chart: BarChart,
    pub groups: Vec<GroupRow>,
    pub dpd: String,
    pub dpr: String,
    pub eod: String,
    pub eor: String,
}

pub struct GroupRow {
    pub name: String,
    pub count: u64,
    pub too_few: bool,
    pub accuracy: String,
    pub tpr: String,
    pub fpr: String,
    pub selection_rate: String,
}

pub struct Privacy {
    /// δ, formatted, when recorded.
    pub delta: Option<String>,
    pub chart: LineChart,
}

pub struct RoundRow {
    pub round: u32,
    pub strategy: String,
    pub hospitals: String,
    pub accuracy: String,
    pub loss: String,
}
