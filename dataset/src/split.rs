//! The splitter: one global held-out test set, and K hospital shards each with a training and a
//! validation part, IID or skewed by a Dirichlet(alpha) draw over one attribute.
//!
//! The unit of assignment is a *duplicate group* (all records with the same SHA-256), so
//! byte-identical copies of one photo always land in the same part. Everything is driven by one
//! seed (ChaCha8), so the same records and config give the same split on every machine.
//!
//! Algorithm:
//! 1. Group records by hash, sort groups by hash, shuffle them with the seed.
//! 2. If `limit` is set, keep groups from the front until `limit` records are kept.
//! 3. The first `test_fraction` of records (whole groups) form the global test set (IID, so it
//!    measures every population).
//! 4. The rest go to hospitals. `Iid`: group i goes to the hospital with the fewest records so far
//!    (ties to the lowest index), so shards have equal sizes. `Dirichlet`: for each class c of the
//!    attribute, draw p_c ~ Dirichlet(alpha, …, alpha) over the K hospitals and cut class c's groups
//!    into K runs of sizes proportional to p_c (the scheme of Hsu et al. 2019 / FedLab); redraw
//!    (up to 1,000 times) until every hospital has at least `min_per_hospital` records.
//! 5. Within each hospital, the first `val_fraction` of its records (whole groups) are validation.
//!
//! Small alpha (0.1–0.5) gives hospitals very different populations; large alpha (100) is close to
//! IID.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};
use crate::labels::{Attribute, Record};
use crate::manifest::{Manifest, write_atomic};

/// How records are spread over hospitals.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SplitScheme {
    /// Every hospital sees the same population.
    Iid,
    /// Label skew over `attribute`: class proportions per hospital drawn from Dirichlet(alpha).
    Dirichlet { alpha: f64, attribute: Attribute },
}

impl fmt::Display for SplitScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitScheme::Iid => f.write_str("iid"),
            SplitScheme::Dirichlet { alpha, attribute } => write!(f, "dirichlet(alpha={alpha}, {attribute})"),
        }
    }
}

/// Scheme names as given on the command line: `iid` or `dirichlet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeKind {
    Iid,
    Dirichlet,
}

impl FromStr for SchemeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "iid" => Ok(SchemeKind::Iid),
            "dirichlet" | "non-iid" | "noniid" => Ok(SchemeKind::Dirichlet),
            _ => Err(format!("unknown split scheme '{s}' (expected iid or dirichlet)")),
        }
    }
}

/// Configuration of [`split`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// Number of hospital shards, K ≥ 1.
    pub hospitals: usize,
    /// Fraction of records in the global test set, in [0, 1).
    pub test_fraction: f64,
    /// Fraction of each hospital's records in its validation part, in [0, 1).
    pub val_fraction: f64,
    pub scheme: SplitScheme,
    pub seed: u64,
    /// Use at most this many records in total (a seeded random subset, whole duplicate groups),
    /// for fast demos and tests.
    pub limit: Option<usize>,
    /// Dirichlet redraws until each hospital has at least this many records (train + val).
    pub min_per_hospital: usize,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            hospitals: 4,
            test_fraction: 0.2,
            val_fraction: 0.1,
            scheme: SplitScheme::Iid,
            seed: 0,
            limit: None,
            min_per_hospital: 10,
        }
    }
}

/// One hospital's data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HospitalShard {
    pub train: Vec<Record>,
    pub val: Vec<Record>,
}

impl HospitalShard {
    pub fn len(&self) -> usize {
        self.train.len() + self.val.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The result of [`split`].
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub test: Vec<Record>,
    pub hospitals: Vec<HospitalShard>,
}

/// A duplicate group: indices into the records, all with one hash.
struct Group {
    members: Vec<usize>,
}

/// Splits `records` as described in the module docs.
pub fn split(records: &[Record], config: &SplitConfig) -> Result<Split> {
    validate(config)?;
    let mut by_hash: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        by_hash.entry(&r.sha256).or_default().push(i);
    }
    let mut groups: Vec<Group> = by_hash.into_values().map(|members| Group { members }).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    groups.shuffle(&mut rng);
    if let Some(limit) = config.limit {
        let mut kept = 0;
        groups.retain(|g| {
            let keep = kept < limit;
            if keep {
                kept += g.members.len();
            }
            keep
        });
    }
    let total: usize = groups.iter().map(|g| g.members.len()).sum();
    let n_test = (config.test_fraction * total as f64).round() as usize;
    let (test_groups, pool) = take_records(groups, n_test);

    let assignment: Vec<Vec<Group>> = match config.scheme {
        SplitScheme::Iid => assign_iid(pool, config.hospitals),
        SplitScheme::Dirichlet { alpha, attribute } => {
            assign_dirichlet(pool, records, config, alpha, attribute, &mut rng)?
        }
    };
    let collect = |gs: &[Group]| -> Vec<Record> {
        gs.iter()
            .flat_map(|g| g.members.iter().map(|&i| records[i].clone()))
            .collect()
    };
    let hospitals = assignment
        .into_iter()
        .map(|mut gs| {
            gs.shuffle(&mut rng);
            let n: usize = gs.iter().map(|g| g.members.len()).sum();
            let n_val = (config.val_fraction * n as f64).round() as usize;
            let (val, train) = take_records(gs, n_val);
            HospitalShard {
                train: collect(&train),
                val: collect(&val),
            }
        })
        .collect();
    Ok(Split {
        test: collect(&test_groups),
        hospitals,
    })
}

fn validate(c: &SplitConfig) -> Result<()> {
    let bad = |m: String| Err(DatasetError::Config(m));
    if c.hospitals == 0 {
        return bad("hospitals must be at least 1".into());
    }
    if !(0.0..1.0).contains(&c.test_fraction) {
        return bad(format!("test fraction {} is not in [0, 1)", c.test_fraction));
    }
    if !(0.0..1.0).contains(&c.val_fraction) {
        return bad(format!("validation fraction {} is not in [0, 1)", c.val_fraction));
    }
    if let SplitScheme::Dirichlet { alpha, .. } = c.scheme
        && !(alpha.is_finite() && alpha > 0.0)
    {
        return bad(format!("Dirichlet alpha {alpha} must be a positive number"));
    }
    Ok(())
}

/// Takes whole groups from the front until at least `n` records are taken (stopping before a group
/// that would overshoot by more than it undershoots). Returns (taken, rest).
fn take_records(groups: Vec<Group>, n: usize) -> (Vec<Group>, Vec<Group>) {
    let mut taken = Vec::new();
    let mut rest = Vec::new();
    let mut count = 0;
    for g in groups {
        if count < n && (count + g.members.len()).abs_diff(n) <= n - count {
            count += g.members.len();
            taken.push(g);
        } else {
            rest.push(g);
        }
    }
    (taken, rest)
}

fn assign_iid(pool: Vec<Group>, k: usize) -> Vec<Vec<Group>> {
    let mut out: Vec<Vec<Group>> = (0..k).map(|_| Vec::new()).collect();
    let mut sizes = vec![0usize; k];
    for g in pool {
        let h = (0..k).min_by_key(|&h| (sizes[h], h)).expect("k >= 1");
        sizes[h] += g.members.len();
        out[h].push(g);
    }
    out
}

fn assign_dirichlet(
    pool: Vec<Group>,
    records: &[Record],
    config: &SplitConfig,
    alpha: f64,
    attribute: Attribute,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<Group>>> {
    let k = config.hospitals;
    // Groups by the class of their first member (copies with disagreeing labels are rare).
    let mut by_class: Vec<Vec<Group>> = (0..attribute.num_classes()).map(|_| Vec::new()).collect();
    for g in pool {
        by_class[attribute.class_of(&records[g.members[0]].labels)].push(g);
    }
    let class_sizes: Vec<usize> = by_class
        .iter()
        .map(|gs| gs.iter().map(|g| g.members.len()).sum())
        .collect();
    let total: usize = class_sizes.iter().sum();
    if total < config.min_per_hospital * k {
        return Err(DatasetError::Config(format!(
            "{total} records cannot give {k} hospitals at least {} each",
            config.min_per_hospital
        )));
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| DatasetError::Config(format!("alpha {alpha}: {e}")))?;
    const MAX_TRIES: usize = 1000;
    for _ in 0..MAX_TRIES {
        // cuts[c][h] = number of class-c groups that hospital h gets.
        let mut cuts = Vec::with_capacity(by_class.len());
        let mut sizes = vec![0usize; k];
        for gs in &by_class {
            let p = dirichlet(&gamma, k, rng);
            let counts = proportional_counts(gs.len(), &p);
            let mut start = 0;
            for (h, &c) in counts.iter().enumerate() {
                sizes[h] += gs[start..start + c]
                    .iter()
                    .map(|g| g.members.len())
                    .sum::<usize>();
                start += c;
            }
            cuts.push(counts);
        }
        if sizes.iter().all(|&s| s >= config.min_per_hospital) {
            let mut out: Vec<Vec<Group>> = (0..k).map(|_| Vec::new()).collect();
            for (gs, counts) in by_class.into_iter().zip(cuts) {
                let mut it = gs.into_iter();
                for (h, c) in counts.into_iter().enumerate() {
                    out[h].extend(it.by_ref().take(c));
                }
            }
            return Ok(out);
        }
    }
    Err(DatasetError::Config(format!(
        "no Dirichlet(alpha={alpha}) draw in {MAX_TRIES} gave every one of {k} hospitals at least {} records; \
         raise alpha, lower the hospital count or the minimum",
        config.min_per_hospital
    )))
}

/// One draw from a symmetric Dirichlet via normalised Gamma draws. If every draw underflows to zero
/// (tiny alpha), all mass goes to one uniformly chosen hospital, which is the limit of the
/// distribution.
fn dirichlet(gamma: &Gamma<f64>, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut p: Vec<f64> = (0..k).map(|_| gamma.sample(rng)).collect();
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        p.iter_mut().for_each(|x| *x /= sum);
    } else {
        let h = rand::Rng::random_range(rng, 0..k);
        p = (0..k).map(|i| if i == h { 1.0 } else { 0.0 }).collect();
    }
    p
}

/// Integer counts summing to `n`, proportional to `p` (largest remainders).
fn proportional_counts(n: usize, p: &[f64]) -> Vec<usize> {
    let exact: Vec<f64> = p.iter().map(|x| x * n as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut left = n - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

/// Per-class counts of a set of records for one attribute.
pub fn class_counts(records: &[Record], attribute: Attribute) -> Vec<usize> {
    let mut counts = vec![0; attribute.num_classes()];
    for r in records {
        counts[attribute.class_of(&r.labels)] += 1;
    }
    counts
}

/// File name of the split summary written by [`Split::write`].
pub const SPLIT_FILE: &str = "split.json";

#[derive(Debug, Serialize, Deserialize)]
struct SplitJson {
    format: String,
    config: SplitConfig,
    test: usize,
    hospitals: Vec<ShardCounts>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardCounts {
    dir: String,
    train: usize,
    val: usize,
}

/// Directory name of hospital `i` (0-based) in a split directory: `hospital-0`, `hospital-1`, …
pub fn hospital_dir_name(i: usize) -> String {
    format!("hospital-{i}")
}

impl Split {
    /// Writes the split as a directory of manifests, all pointing at `image_root`:
    ///
    /// ```text
    /// OUT/split.json                       config and counts
    /// OUT/test/{manifest.json,labels.csv}  global test set
    /// OUT/hospital-0/train/…  OUT/hospital-0/val/…   one pair per hospital
    /// ```
    pub fn write(&self, out: impl AsRef<Path>, image_root: &Path, config: &SplitConfig) -> Result<()> {
        let out = out.as_ref();
        Manifest::new(image_root, self.test.clone()).write(out.join("test"))?;
        let mut shards = Vec::new();
        for (i, h) in self.hospitals.iter().enumerate() {
            let dir = hospital_dir_name(i);
            Manifest::new(image_root, h.train.clone()).write(out.join(&dir).join("train"))?;
            Manifest::new(image_root, h.val.clone()).write(out.join(&dir).join("val"))?;
            shards.push(ShardCounts {
                dir,
                train: h.train.len(),
                val: h.val.len(),
            });
        }
        let json = SplitJson {
            format: "caduceus-split/1".into(),
            config: config.clone(),
            test: self.test.len(),
            hospitals: shards,
        };
        let mut bytes = serde_json::to_vec_pretty(&json).expect("split serialises");
        bytes.push(b'\n');
        write_atomic(&out.join(SPLIT_FILE), &bytes)
    }
}

/// A split read back from disk: manifests keep their image roots.
#[derive(Debug, Clone)]
pub struct SplitDir {
    pub config: SplitConfig,
    pub test: Manifest,
    pub hospitals: Vec<ShardManifests>,
}

/// One hospital's two manifests.
#[derive(Debug, Clone)]
pub struct ShardManifests {
    pub dir: PathBuf,
    pub train: Manifest,
    pub val: Manifest,
}

impl ShardManifests {
    /// Reads `dir/train` and `dir/val` (a directory written by [`Split::write`], such as
    /// `OUT/hospital-0`). This is what a trainer given one shard reads.
    pub fn read(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        Ok(ShardManifests {
            dir: dir.to_path_buf(),
            train: Manifest::read(dir.join("train"))?,
            val: Manifest::read(dir.join("val"))?,
        })
    }
}

impl SplitDir {
    /// Reads a directory written by [`Split::write`].
    pub fn read(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(SPLIT_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DatasetError::io(&path, e))?;
        let json: SplitJson = serde_json::from_str(&text).map_err(|e| DatasetError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let test = Manifest::read(dir.join("test"))?;
        let hospitals = json
            .hospitals
            .iter()
            .map(|h| ShardManifests::read(dir.join(&h.dir)))
            .collect::<Result<Vec<_>>>()?;
        Ok(SplitDir {
            config: json.config,
            test,
            hospitals,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::labels::{Gender, Labels, Race};

    /// 2,000 synthetic records with a realistic race mix, and 40 duplicate pairs.
    fn records() -> Vec<Record> {
        let mut out = Vec::new();
        for i in 0..2000u32 {
            let race = Race::ALL[[0, 0, 0, 0, 1, 1, 2, 2, 3, 4][(i % 10) as usize]];
            let gender = Gender::ALL[(i % 3 % 2) as usize];
            let hash = if i < 80 {
                format!("{:064x}", i / 2)
            } else {
                format!("{:064x}", 10_000 + i)
            };
            out.push(Record {
                file: format!("{}_{}_{}_{i}.jpg.chip.jpg", i % 90, gender.code(), race.code()),
                labels: Labels {
                    age: (i % 90) as u16,
                    gender,
                    race,
                },
                sha256: hash,
            });
        }
        out
    }

    fn race_share(rs: &[Record]) -> Vec<f64> {
        let c = class_counts(rs, Attribute::Race);
        c.iter().map(|&x| x as f64 / rs.len().max(1) as f64).collect()
    }

    fn config(scheme: SplitScheme, seed: u64) -> SplitConfig {
        SplitConfig {
            hospitals: 4,
            scheme,
            seed,
            ..Default::default()
        }
    }

    #[test]
    fn same_seed_same_split_other_seed_other_split() {
        let rs = records();
        let dir = SplitScheme::Dirichlet {
            alpha: 0.5,
            attribute: Attribute::Race,
        };
        for scheme in [SplitScheme::Iid, dir] {
            let a = split(&rs, &config(scheme, 7)).unwrap();
            let b = split(&rs, &config(scheme, 7)).unwrap();
            let c = split(&rs, &config(scheme, 8)).unwrap();
            assert_eq!(a, b);
            assert_ne!(a, c);
        }
    }

    #[test]
    fn every_record_once_and_duplicates_together() {
        let rs = records();
        for scheme in [
            SplitScheme::Iid,
            SplitScheme::Dirichlet {
                alpha: 0.3,
                attribute: Attribute::Race,
            },
        ] {
            let s = split(&rs, &config(scheme, 3)).unwrap();
            let mut part_of_hash: HashMap<&str, String> = HashMap::new();
            let mut seen = HashSet::new();
            let mut parts: Vec<(String, &Vec<Record>)> = vec![("test".into(), &s.test)];
            for (i, h) in s.hospitals.iter().enumerate() {
                parts.push((format!("h{i}/train"), &h.train));
                parts.push((format!("h{i}/val"), &h.val));
            }
            for (name, rs) in parts {
                for r in rs {
                    assert!(seen.insert(r.file.clone()), "{} twice", r.file);
                    let prev = part_of_hash.entry(&r.sha256).or_insert_with(|| name.clone());
                    assert_eq!(*prev, name, "duplicate group {} straddles parts", r.sha256);
                }
            }
            assert_eq!(seen.len(), rs.len());
            assert!(
                (s.test.len() as f64 - 400.0).abs() <= 2.0,
                "test {}",
                s.test.len()
            );
        }
    }

    #[test]
    fn dirichlet_skews_and_iid_does_not() {
        let rs = records();
        let overall = race_share(&rs);
        let max_dev = |s: &Split| {
            s.hospitals
                .iter()
                .map(|h| {
                    let share = race_share(&h.train);
                    share
                        .iter()
                        .zip(&overall)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max)
                })
                .fold(0.0, f64::max)
        };
        let iid = split(&rs, &config(SplitScheme::Iid, 1)).unwrap();
        let skew = split(
            &rs,
            &config(
                SplitScheme::Dirichlet {
                    alpha: 0.3,
                    attribute: Attribute::Race,
                },
                1,
            ),
        )
        .unwrap();
        assert!(max_dev(&iid) < 0.06, "iid deviates {}", max_dev(&iid));
        assert!(
            max_dev(&skew) > 0.25,
            "dirichlet deviates only {}",
            max_dev(&skew)
        );
        let sizes: Vec<usize> = iid.hospitals.iter().map(|h| h.len()).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 2,
            "{sizes:?}"
        );
        assert!(skew.hospitals.iter().all(|h| h.len() >= 10));
    }

    #[test]
    fn limit_and_val_fraction() {
        let rs = records();
        let s = split(
            &rs,
            &SplitConfig {
                limit: Some(500),
                val_fraction: 0.2,
                ..config(SplitScheme::Iid, 2)
            },
        )
        .unwrap();
        let total = s.test.len() + s.hospitals.iter().map(|h| h.len()).sum::<usize>();
        assert!((500..=501).contains(&total), "{total}");
        for h in &s.hospitals {
            assert!((h.val.len() as f64 - 0.2 * h.len() as f64).abs() <= 2.0);
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let rs = records();
        for c in [
            SplitConfig {
                hospitals: 0,
                ..Default::default()
            },
            SplitConfig {
                test_fraction: 1.0,
                ..Default::default()
            },
            SplitConfig {
                scheme: SplitScheme::Dirichlet {
                    alpha: 0.0,
                    attribute: Attribute::Race,
                },
                ..Default::default()
            },
            SplitConfig {
                hospitals: 300,
                min_per_hospital: 10,
                scheme: SplitScheme::Dirichlet {
                    alpha: 1.0,
                    attribute: Attribute::Race,
                },
                ..Default::default()
            },
        ] {
            assert!(matches!(split(&rs, &c), Err(DatasetError::Config(_))), "{c:?}");
        }
    }

    #[test]
    fn write_and_read_back() {
        let rs = records();
        let cfg = config(
            SplitScheme::Dirichlet {
                alpha: 0.5,
                attribute: Attribute::Race,
            },
            9,
        );
        let s = split(&rs, &cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), Path::new("/images"), &cfg).unwrap();
        let back = SplitDir::read(dir.path()).unwrap();
        assert_eq!(back.config, cfg);
        assert_eq!(back.test.records, s.test);
        assert_eq!(back.hospitals.len(), 4);
        assert_eq!(back.hospitals[2].train.records, s.hospitals[2].train);
        assert_eq!(back.hospitals[2].val.image_root, Path::new("/images"));
    }
}
