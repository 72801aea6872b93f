//! Safetensors weights: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; memory-mapped, converted to f32 on load.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::ModelError;

/// The safetensors files of one model folder.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name to index in `files`.
    location: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl WeightStore {
    pub fn open(dir: &Path) -> Result<WeightStore, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| ModelError::config(&index_path, e.to_string()))?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(ModelError::config(
                dir,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        let mut files = Vec::new();
        let mut location = HashMap::new();
        for name in file_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the mapping is read-only and the file is not modified while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let tensors = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for tensor_name in tensors.names() {
                location.insert(tensor_name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(WeightStore { files, location })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Tensor `name` as f32, checked against `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let &file = self
            .location
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        let (path, mmap) = &self.files[file];
        let tensors = SafeTensors::deserialize(mmap).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let view = tensors
            .tensor(name)
            .map_err(|_| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        if view.shape() != shape {
            return Err(ModelError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
}
