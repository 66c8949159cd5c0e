//! Generation-checked handle tables: Python sees `u64` ids, `(generation << 32) | index`.
//! A released or unknown id never aliases a live object (generations only grow).

use std::sync::Arc;

/// A table of shared objects addressed by generation-checked ids.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<(u32, Option<Arc<T>>)>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

fn split(id: u64) -> (usize, u32) {
    ((id & 0xffff_ffff) as usize, (id >> 32) as u32)
}

impl<T> Slab<T> {
    /// Stores `v` and returns its id (never 0).
    pub fn insert(&mut self, v: T) -> u64 {
        let v = Arc::new(v);
        if let Some(i) = self.free.pop() {
            let slot = &mut self.slots[i as usize];
            slot.0 = slot.0.wrapping_add(1).max(1);
            slot.1 = Some(v);
            (u64::from(slot.0) << 32) | u64::from(i)
        } else {
            let i = self.slots.len() as u32;
            self.slots.push((1, Some(v)));
            (1u64 << 32) | u64::from(i)
        }
    }

    /// The object behind `id`, if it is live.
    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        let (i, g) = split(id);
        match self.slots.get(i) {
            Some((gen, Some(v))) if *gen == g => Some(v.clone()),
            _ => None,
        }
    }

    /// Removes and returns the object behind `id`, if it is live.
    pub fn remove(&mut self, id: u64) -> Option<Arc<T>> {
        let (i, g) = split(id);
        match self.slots.get_mut(i) {
            Some((gen, v @ Some(_))) if *gen == g => {
                let out = v.take();
                self.free.push(i as u32);
                out
            }
            _ => None,
        }
    }

    /// Removes everything (objects are dropped when their last user lets go).
    pub fn drain(&mut self) -> Vec<Arc<T>> {
        let mut out = Vec::new();
        for (i, (_, v)) in self.slots.iter_mut().enumerate() {
            if let Some(v) = v.take() {
                out.push(v);
                self.free.push(i as u32);
            }
        }
        out
    }
}
