//! The target of a POSIX run: `--num_files` files under `--filepath`, registered with the
//! initiator's own agent (keys 1..=num_files).
//!
//! This module creates them (each holding the whole layout, so that READs find data), resets and
//! checks a row's descriptors in them with ordinary file I/O between rows, and removes them at the
//! end. Descriptor `j` of a slot lies in file `j mod num_files` ([`crate::layout::file_pos`]).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::cli::Config;
use crate::layout::{desc_offsets, file_pos};

/// The benchmark's files.
pub struct TargetFiles {
    paths: Vec<PathBuf>,
}

/// Removes the benchmark's files at the end.
pub struct FileCleanup(Vec<PathBuf>);

impl Drop for FileCleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl TargetFiles {
    /// Names the files (nothing is created yet).
    pub fn new(cfg: &Config) -> TargetFiles {
        let mut paths = Vec::new();
        for f in 0..cfg.args.num_files {
            paths.push(
                cfg.filepath
                    .join(format!("rixl-bench-{}-{f}.dat", std::process::id())),
            );
        }
        TargetFiles { paths }
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// A guard that removes the files when dropped; take it before [`TargetFiles::create`], so
    /// that a failure half-way removes the files already made.
    pub fn cleanup(&self) -> FileCleanup {
        FileCleanup(self.paths.clone())
    }

    /// Creates the files: every file holds the whole layout, pre-filled with 0xaa (READs need
    /// data there).
    pub fn create(&self, cfg: &Config) -> Result<(), String> {
        let size = cfg.target_bytes() as usize;
        let chunk = vec![0xaau8; (1 << 20).min(size)];
        for p in &self.paths {
            let mut f = std::fs::File::create(p)
                .map_err(|e| format!("--filepath: cannot create {}: {e}", p.display()))?;
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len());
                f.write_all(&chunk[..n])
                    .map_err(|e| format!("--filepath: writing {}: {e}", p.display()))?;
                left -= n;
            }
            f.sync_all().ok();
        }
        Ok(())
    }

    /// Resets every target slot's descriptors to 0xaa.
    pub fn fill(&self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        let paths = &self.paths;
        let files = open_all(paths)?;
        let chunk = vec![0xaau8; block as usize];
        let offs = desc_offsets(cfg.scattered, block, batch, true);
        for s in 0..cfg.target_slots() {
            for (j, &o) in offs.iter().enumerate() {
                let (f, off) = file_pos(cfg, s, j as u64, o);
                files[f]
                    .write_all_at(&chunk, off)
                    .map_err(|e| format!("filling {}: {e}", paths[f].display()))?;
            }
        }
        Ok(())
    }

    /// Checks that every target slot's descriptors hold 0xbb.
    pub fn verify(&self, cfg: &Config, block: u64, batch: u64) -> Result<(), String> {
        let paths = &self.paths;
        let files = open_all(paths)?;
        let mut chunk = vec![0u8; block as usize];
        let offs = desc_offsets(cfg.scattered, block, batch, true);
        for s in 0..cfg.target_slots() {
            for (j, &o) in offs.iter().enumerate() {
                let (f, off) = file_pos(cfg, s, j as u64, o);
                files[f]
                    .read_exact_at(&mut chunk, off)
                    .map_err(|e| format!("reading back {}: {e}", paths[f].display()))?;
                if let Some(i) = chunk.iter().position(|&x| x != 0xbb) {
                    return Err(format!(
                        "consistency check failed: {} byte at offset {} is {:#04x}, expected 0xbb",
                        paths[f].display(),
                        off + i as u64,
                        chunk[i]
                    ));
                }
            }
        }
        Ok(())
    }
}

fn open_all(paths: &[PathBuf]) -> Result<Vec<std::fs::File>, String> {
    paths
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| format!("opening {}: {e}", p.display()))
        })
        .collect()
}
