//! The loader: decodes a manifest's images into one contiguous `f32` buffer in NCHW order,
//! normalised per channel, with the task's class labels and every example's sensitive attributes.
use std::path::Path;

use rand::RngCore;

use crate::error::{DatasetError, Result};
use crate::labels::{Attribute, Labels};
use crate::manifest::Manifest;

/// Per-channel normalisation: `x = (pixel / 255 − mean[c]) / std[c]`, channels in RGB order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// Channel mean and standard deviation of all 23,703 parseable utkface-64 images (measured by
    /// the `utkface_channel_statistics` test, run with `CADUCEUS_DATA_DIR` set and `--ignored`).
    pub const UTKFACE: Normalization = Normalization {
        mean: [0.597, 0.456, 0.392],
        std: [0.257, 0.230, 0.226],
    };
    /// No normalisation beyond scaling to [0, 1].
    pub const UNIT: Normalization = Normalization {
        mean: [0.0; 3],
        std: [1.0; 3],
    };
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization::UTKFACE
    }
}

/// Options of [`ImageSet::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images are resized to `size × size` if they are not already (utkface-64 is 64×64).
    pub size: u32,
    pub normalization: Normalization,
    /// Decoding threads; 0 uses every available core.
    pub threads: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            size: 64,
            normalization: Normalization::UTKFACE,
            threads: 0,
        }
    }
}

/// Decoded images with labels for one task: what the trainer trains and evaluates on.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// The attribute predicted: labels are its class indices.
    pub task: Attribute,
    pub height: usize,
    pub width: usize,
    /// `len() × 3 × height × width` values, example-major, then channel (RGB), row, column.
    pub images: Vec<f32>,
    /// Class index of each example for `task`.
    pub labels: Vec<u32>,
    /// All labels of each example: the sensitive attributes for fairness metrics.
    pub attributes: Vec<Labels>,
    /// File name of each example, as in the manifest.
    pub files: Vec<String>,
}

/// Channels per image (RGB).
pub const CHANNELS: usize = 3;

impl ImageSet {
    /// Builds a set from parts (for synthetic data); checks that the lengths agree.
    pub fn new(
        task: Attribute,
        height: usize,
        width: usize,
        images: Vec<f32>,
        attributes: Vec<Labels>,
        files: Vec<String>,
    ) -> Result<Self> {
        let n = attributes.len();
        if images.len() != n * CHANNELS * height * width || files.len() != n {
            return Err(DatasetError::Config(format!(
                "image set parts disagree: {} values for {n} examples of 3×{height}×{width}, {} file names",
                images.len(),
                files.len()
            )));
        }
        let labels = attributes.iter().map(|l| task.class_of(l) as u32).collect();
        Ok(ImageSet {
            task,
            height,
            width,
            images,
            labels,
            attributes,
            files,
        })
    }

    /// Decodes every image of `manifest`, in parallel. An image that cannot be read or decoded
    /// gives an error naming its path.
    pub fn load(manifest: &Manifest, task: Attribute, config: &LoaderConfig) -> Result<Self> {
        let size = config.size as usize;
        if size == 0 {
            return Err(DatasetError::Config("image size must be positive".into()));
        }
        let per_image = CHANNELS * size * size;
        let n = manifest.records.len();
        let mut images = vec![0f32; n * per_image];
        let threads = if config.threads == 0 {
            std::thread::available_parallelism().map_or(1, |p| p.get())
        } else {
            config.threads
        }
        .clamp(1, n.max(1));
        let per_thread = n.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = images
                .chunks_mut(per_thread * per_image)
                .zip(manifest.records.chunks(per_thread))
                .map(|(out, records)| {
                    scope.spawn(move || -> Result<()> {
                        for (r, dst) in records.iter().zip(out.chunks_mut(per_image)) {
                            decode_into(&manifest.image_root.join(&r.file), config, dst)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("decoder thread panicked"))
                .collect::<Result<Vec<()>>>()
        })?;
        let attributes: Vec<Labels> = manifest.records.iter().map(|r| r.labels).collect();
        let files = manifest.records.iter().map(|r| r.file.clone()).collect();
        ImageSet::new(task, size, size, images, attributes, files)
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per example: `3 × height × width`.
    pub fn example_len(&self) -> usize {
        CHANNELS * self.height * self.width
    }

    /// The normalised pixels of example `i` (CHW).
    pub fn image(&self, i: usize) -> &[f32] {
        let l = self.example_len();
        &self.images[i * l..(i + 1) * l]
    }

    pub fn num_classes(&self) -> usize {
        self.task.num_classes()
    }

    /// Copies examples `indices` into `images` (NCHW) and `labels`, replacing their contents and
    /// reusing their allocations. With `flip` given, each example is mirrored left-right with
    /// probability ½ (the light augmentation for faces).
    pub fn fill_batch(
        &self,
        indices: &[usize],
        mut flip: Option<&mut dyn RngCore>,
        images: &mut Vec<f32>,
        labels: &mut Vec<u32>,
    ) {
        let l = self.example_len();
        images.clear();
        images.reserve(indices.len() * l);
        labels.clear();
        for &i in indices {
            let src = self.image(i);
            let mirror = flip.as_mut().is_some_and(|rng| rng.next_u32() & 1 == 1);
            if mirror {
                for row in src.chunks_exact(self.width) {
                    images.extend(row.iter().rev());
                }
            } else {
                images.extend_from_slice(src);
            }
            labels.push(self.labels[i]);
        }
    }

    /// A new set with the examples `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> ImageSet {
        let mut images = Vec::new();
        let mut labels = Vec::new();
        self.fill_batch(indices, None, &mut images, &mut labels);
        ImageSet {
            task: self.task,
            height: self.height,
            width: self.width,
            images,
            labels,
            attributes: indices.iter().map(|&i| self.attributes[i]).collect(),
            files: indices.iter().map(|&i| self.files[i].clone()).collect(),
        }
    }

    /// The same examples, labelled for another task.
    pub fn with_task(mut self, task: Attribute) -> ImageSet {
        self.labels = self.attributes.iter().map(|l| task.class_of(l) as u32).collect();
        self.task = task;
        self
    }
}

fn decode_into(path: &Path, config: &LoaderConfig, dst: &mut [f32]) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    let img = image::load_from_memory(&bytes).map_err(|e| DatasetError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut rgb = img.into_rgb8();
    if rgb.width() != config.size || rgb.height() != config.size {
        rgb = image::imageops::resize(
            &rgb,
            config.size,
            config.size,
            image::imageops::FilterType::Triangle,
        );
    }
    let plane = (config.size * config.size) as usize;
    let norm = &config.normalization;
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
    for (p, px) in rgb.pixels().enumerate() {
        for c in 0..CHANNELS {
            dst[c * plane + p] = px.0[c] as f32 * scale[c] - shift[c];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{Gender, Race, Record};

    fn write_jpeg(path: &Path, size: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
        let img = image::RgbImage::from_fn(size, size, |x, y| image::Rgb(f(x, y)));
        img.save_with_format(path, image::ImageFormat::Jpeg).unwrap();
    }

    fn record(file: &str, gender: Gender, race: Race) -> Record {
        Record {
            file: file.into(),
            labels: Labels {
                age: 30,
                gender,
                race,
            },
            sha256: "0".repeat(64),
        }
    }

    #[test]
    fn loads_normalises_resizes_and_flips() {
        let dir = tempfile::tempdir().unwrap();
        // Left half dark, right half bright; one at 64×64, one at 32×32 to be resized.
        write_jpeg(&dir.path().join("a.jpg"), 64, |x, _| {
            if x < 32 { [0; 3] } else { [255; 3] }
        });
        write_jpeg(&dir.path().join("b.jpg"), 32, |_, _| [128, 128, 128]);
        let m = Manifest::new(
            dir.path(),
            vec![
                record("a.jpg", Gender::Female, Race::Asian),
                record("b.jpg", Gender::Male, Race::White),
            ],
        );
        let cfg = LoaderConfig {
            normalization: Normalization::UNIT,
            threads: 2,
            ..Default::default()
        };
        let set = ImageSet::load(&m, Attribute::Gender, &cfg).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.images.len(), 2 * 3 * 64 * 64);
        assert_eq!(set.labels, vec![1, 0]);
        assert_eq!(set.attributes[0].race, Race::Asian);
        let a = set.image(0);
        assert!(a[5] < 0.1 && a[60] > 0.9, "{} {}", a[5], a[60]);
        assert!(set.image(1).iter().all(|v| (v - 0.5).abs() < 0.05));

        // Flip: with an RNG that always says "flip", the left becomes bright.
        struct Always;
        impl RngCore for Always {
            fn next_u32(&mut self) -> u32 {
                1
            }
            fn next_u64(&mut self) -> u64 {
                1
            }
            fn fill_bytes(&mut self, d: &mut [u8]) {
                d.fill(1)
            }
        }
        let (mut imgs, mut labels) = (Vec::new(), Vec::new());
        set.fill_batch(&[0], Some(&mut Always), &mut imgs, &mut labels);
        assert!(imgs[5] > 0.9 && imgs[60] < 0.1);
        assert_eq!(imgs.len(), 3 * 64 * 64);
        set.fill_batch(&[1, 0], None, &mut imgs, &mut labels);
        assert_eq!(labels, vec![0, 1]);
        assert_eq!(&imgs[3 * 64 * 64..], set.image(0));

        let race = set.clone().with_task(Attribute::Race);
        assert_eq!(race.labels, vec![2, 0]);
        assert_eq!(race.num_classes(), 5);
    }

    #[test]
    fn corrupt_and_missing_images_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.jpg"), b"\xff\xd8\xff not really a jpeg").unwrap();
        for file in ["bad.jpg", "missing.jpg"] {
            let m = Manifest::new(dir.path(), vec![record(file, Gender::Male, Race::White)]);
            let err = ImageSet::load(&m, Attribute::Gender, &LoaderConfig::default()).unwrap_err();
            assert!(err.to_string().contains(file), "{err}");
        }
    }

    /// Prints the channel mean and standard deviation of every parseable utkface-64 image, the
    /// source of [`Normalization::UTKFACE`]:
    /// `CADUCEUS_DATA_DIR=../shared/data cargo test -p caduceus-dataset --release -- --ignored --nocapture utkface_channel_statistics`
    #[test]
    #[ignore = "reads all 23,703 images; run by hand to re-derive the normalisation"]
    fn utkface_channel_statistics() {
        let dir = crate::data_dir()
            .expect("set CADUCEUS_DATA_DIR")
            .join("utkface-64");
        let report = crate::import(&dir).unwrap();
        let m = Manifest::new(&dir, report.records);
        let cfg = LoaderConfig {
            normalization: Normalization::UNIT,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let set = ImageSet::load(&m, Attribute::Gender, &cfg).unwrap();
        println!(
            "decoded {} images in {:.2}s",
            set.len(),
            t.elapsed().as_secs_f64()
        );
        let plane = set.height * set.width;
        for c in 0..CHANNELS {
            let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
            for i in 0..set.len() {
                for &v in &set.image(i)[c * plane..(c + 1) * plane] {
                    sum += v as f64;
                    sq += (v as f64) * (v as f64);
                    n += 1.0;
                }
            }
            let mean = sum / n;
            println!(
                "channel {c}: mean {mean:.3} std {:.3}",
                (sq / n - mean * mean).sqrt()
            );
        }
    }
}
