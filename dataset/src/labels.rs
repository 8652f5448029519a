//! Labels of one face image: age, age group, gender and race, and the parser for UTKFace file names.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Gender as coded in UTKFace file names: `0` = male, `1` = female.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gender {
    Male,
    Female,
}

impl Gender {
    /// All values, in code order.
    pub const ALL: [Gender; 2] = [Gender::Male, Gender::Female];

    /// The UTKFace code (0 = male, 1 = female), also the class index for the `gender` task.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Inverse of [`Gender::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(code as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Gender::Male => "male",
            Gender::Female => "female",
        }
    }
}

/// Race as coded in UTKFace file names: 0 = White, 1 = Black, 2 = Asian, 3 = Indian, 4 = Others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Race {
    White,
    Black,
    Asian,
    Indian,
    Other,
}

impl Race {
    /// All values, in code order.
    pub const ALL: [Race; 5] = [Race::White, Race::Black, Race::Asian, Race::Indian, Race::Other];

    /// The UTKFace code (0..=4), also the class index for the `race` task.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Inverse of [`Race::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(code as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Race::White => "white",
            Race::Black => "black",
            Race::Asian => "asian",
            Race::Indian => "indian",
            Race::Other => "other",
        }
    }
}

/// Age bucket. The buckets are `0-2, 3-9, 10-19, 20-29, 30-39, 40-49, 50-59, 60-69, 70+`
/// (index 0 to 8): infants, children, then decades, with everyone from 70 on in one bucket because
/// UTKFace has few faces past 80.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgeGroup(u8);

impl AgeGroup {
    /// Number of buckets.
    pub const COUNT: usize = 9;
    /// Bucket labels, by index.
    pub const LABELS: [&'static str; Self::COUNT] = [
        "0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+",
    ];

    /// The bucket of an age in years.
    pub fn of_age(age: u16) -> Self {
        AgeGroup(match age {
            0..=2 => 0,
            3..=9 => 1,
            70.. => 8,
            a => (a / 10 + 1) as u8,
        })
    }

    /// Bucket from its index (0..9).
    pub fn from_index(index: usize) -> Option<Self> {
        (index < Self::COUNT).then_some(AgeGroup(index as u8))
    }

    /// The bucket index, also the class index for the `age-group` task.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The label, such as `20-29` or `70+`.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

impl fmt::Display for AgeGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for AgeGroup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::LABELS
            .iter()
            .position(|l| *l == s)
            .map(|i| AgeGroup(i as u8))
            .ok_or_else(|| {
                format!(
                    "unknown age group '{s}' (expected one of {})",
                    Self::LABELS.join(", ")
                )
            })
    }
}

/// A labelled attribute of a face: used both as the prediction task and as the attribute a
/// non-IID split skews over, and as the sensitive attribute of fairness metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attribute {
    /// Binary: 0 = male, 1 = female. The demo task.
    Gender,
    /// Five classes: white, black, asian, indian, other.
    Race,
    /// Nine age buckets, see [`AgeGroup`].
    AgeGroup,
}

impl Attribute {
    pub const ALL: [Attribute; 3] = [Attribute::Gender, Attribute::Race, Attribute::AgeGroup];

    /// Number of classes of this attribute.
    pub fn num_classes(self) -> usize {
        match self {
            Attribute::Gender => 2,
            Attribute::Race => 5,
            Attribute::AgeGroup => AgeGroup::COUNT,
        }
    }

    /// Class names, by class index.
    pub fn class_names(self) -> Vec<&'static str> {
        match self {
            Attribute::Gender => Gender::ALL.iter().map(|g| g.name()).collect(),
            Attribute::Race => Race::ALL.iter().map(|r| r.name()).collect(),
            Attribute::AgeGroup => AgeGroup::LABELS.to_vec(),
        }
    }

    /// The name used on the command line and in files: `gender`, `race`, `age-group`.
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Gender => "gender",
            Attribute::Race => "race",
            Attribute::AgeGroup => "age-group",
        }
    }

    /// The class index of a record for this attribute.
    pub fn class_of(self, labels: &Labels) -> usize {
        match self {
            Attribute::Gender => labels.gender.code() as usize,
            Attribute::Race => labels.race.code() as usize,
            Attribute::AgeGroup => labels.age_group().index(),
        }
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Attribute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "gender" | "sex" => Ok(Attribute::Gender),
            "race" => Ok(Attribute::Race),
            "age-group" | "age_group" | "agegroup" | "age" => Ok(Attribute::AgeGroup),
            _ => Err(format!(
                "unknown attribute '{s}' (expected gender, race or age-group)"
            )),
        }
    }
}

/// The labels of one face.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Labels {
    /// Age in years.
    pub age: u16,
    pub gender: Gender,
    pub race: Race,
}

impl Labels {
    pub fn age_group(&self) -> AgeGroup {
        AgeGroup::of_age(self.age)
    }
}

/// One image of a dataset: its file name (relative to the dataset's image root), labels and the
/// SHA-256 of its bytes (hex), which identifies byte-identical duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    pub file: String,
    pub labels: Labels,
    pub sha256: String,
}

/// The oldest age the parser accepts. UTKFace goes to 116.
pub const MAX_AGE: u16 = 130;

/// Parses a UTKFace file name, `AGE_GENDER_RACE_DATETIME.jpg.chip.jpg`, into its labels.
///
/// Also accepted, for data brought in the same naming scheme: plain `AGE_GENDER_RACE_DATETIME.jpg`,
/// `.jpeg` or `.png`. The error says why a name does not parse.
pub fn parse_file_name(name: &str) -> Result<Labels, String> {
    let stem = [".jpg.chip.jpg", ".jpg", ".jpeg", ".png"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .ok_or_else(|| "does not end in .jpg.chip.jpg (nor .jpg, .jpeg, .png)".to_string())?;
    let fields: Vec<&str> = stem.split('_').collect();
    if fields.len() != 4 {
        return Err(format!(
            "expected 4 fields AGE_GENDER_RACE_DATETIME separated by '_', found {} in '{stem}'",
            fields.len()
        ));
    }
    let digits = |what: &str, s: &str| -> Result<(), String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            Err(format!("{what} field '{s}' is not a non-empty run of digits"))
        } else {
            Ok(())
        }
    };
    digits("age", fields[0])?;
    digits("gender", fields[1])?;
    digits("race", fields[2])?;
    digits("datetime", fields[3])?;
    let age: u16 = fields[0]
        .parse()
        .ok()
        .filter(|a| *a <= MAX_AGE)
        .ok_or_else(|| format!("age '{}' is out of range 0..={MAX_AGE}", fields[0]))?;
    let gender = fields[1]
        .parse::<u8>()
        .ok()
        .and_then(Gender::from_code)
        .ok_or_else(|| format!("gender '{}' is not 0 (male) or 1 (female)", fields[1]))?;
    let race = fields[2]
        .parse::<u8>()
        .ok()
        .and_then(Race::from_code)
        .ok_or_else(|| format!("race '{}' is not one of 0..=4", fields[2]))?;
    Ok(Labels { age, gender, race })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_names() {
        let l = parse_file_name("100_1_0_20170110183726390.jpg.chip.jpg").unwrap();
        assert_eq!(l.age, 100);
        assert_eq!(l.gender, Gender::Female);
        assert_eq!(l.race, Race::White);
        assert_eq!(l.age_group().label(), "70+");
        let l = parse_file_name("1_0_4_20161219140627985.jpg").unwrap();
        assert_eq!((l.age, l.gender, l.race), (1, Gender::Male, Race::Other));
    }

    #[test]
    fn rejects_the_known_utkface_defects() {
        for (name, why) in [
            ("39_1_20170116174525125.jpg.chip.jpg", "expected 4 fields"),
            ("61_1_20170109142408075.jpg.chip.jpg", "expected 4 fields"),
            ("61_1_20170109150557335.jpg.chip.jpg", "expected 4 fields"),
            ("24_0_1_20170116220224657 .jpg.chip.jpg", "datetime field"),
            ("55_0_0_20170116232725357jpg.chip.jpg", "datetime field"),
            ("12_2_0_20170116232725357.jpg.chip.jpg", "gender '2'"),
            ("12_0_5_20170116232725357.jpg.chip.jpg", "race '5'"),
            ("999_0_1_20170116232725357.jpg.chip.jpg", "out of range"),
            ("notes.txt", "does not end in"),
        ] {
            let err = parse_file_name(name).unwrap_err();
            assert!(err.contains(why), "{name}: {err}");
        }
    }

    #[test]
    fn age_buckets() {
        let cases = [
            (0, "0-2"),
            (2, "0-2"),
            (3, "3-9"),
            (9, "3-9"),
            (10, "10-19"),
            (19, "10-19"),
        ];
        for (age, label) in cases {
            assert_eq!(AgeGroup::of_age(age).label(), label);
        }
        for (age, label) in [
            (20, "20-29"),
            (45, "40-49"),
            (69, "60-69"),
            (70, "70+"),
            (116, "70+"),
        ] {
            assert_eq!(AgeGroup::of_age(age).label(), label);
        }
        assert_eq!("30-39".parse::<AgeGroup>().unwrap().index(), 4);
        assert!("30-40".parse::<AgeGroup>().is_err());
    }
}
