//! Where each instance goes in the file set: PATIENT -> STUDY -> SERIES -> instance
//! grouping, ordering, and File IDs (`DICOM/PA000001/ST000001/SE000001/IM000001`: at most
//! 8 components of at most 8 characters from A-Z, 0-9 and `_`, PS3.10 8.2, PS3.12).

use std::collections::HashMap;

/// The top folder of every DICOM file in our sets.
pub const DICOM_FOLDER: &str = "DICOM";
/// The folder of non-DICOM attachments (never inside the DICOM tree).
pub const ATTACHMENT_FOLDER: &str = "ATTACH";

/// Instances grouped: patients -> studies -> series -> instance numbers (the order in
/// which they were added).
#[derive(Debug, Default)]
pub struct Tree {
    /// Patients in order.
    pub patients: Vec<Group<Group<Group<u32>>>>,
}

/// One level of the hierarchy: its members, in order.
#[derive(Debug)]
pub struct Group<T> {
    /// The instance the group's record keys are taken from (the first one added).
    pub first: u32,
    /// Members in order.
    pub members: Vec<T>,
    /// What orders the group among its siblings: (Study Date + Time, 0) for a study,
    /// ("", Series Number) for a series.
    order: (String, i64),
}

impl<T> Group<T> {
    fn new(first: u32, order: (String, i64)) -> Group<T> {
        Group {
            first,
            members: Vec::new(),
            order,
        }
    }
}

/// What the layout needs to know of each instance.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Patient ID (may be empty).
    pub patient_id: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// (Study Date, Study Time) for ordering studies.
    pub study_when: String,
    /// Series Number for ordering series.
    pub series_number: i64,
    /// Instance Number for ordering instances.
    pub instance_number: i64,
}

/// Groups instances as they are added and orders them when done: studies by date, series
/// by number, instances by number (ties keep the order of adding). It keeps a few numbers
/// per instance and the keys of each patient, study and series, never the instances.
#[derive(Debug, Default)]
pub struct Layout {
    tree: Tree,
    patients: HashMap<String, usize>,
    studies: HashMap<String, (usize, usize)>,
    series: HashMap<String, (usize, usize, usize)>,
    /// Instance Number of each instance added.
    numbers: Vec<i64>,
}

impl Layout {
    /// Adds the next instance; its number in the tree is the count of instances before it.
    pub fn add(&mut self, item: &Placement) {
        let i = u32::try_from(self.numbers.len()).unwrap_or(u32::MAX);
        self.numbers.push(item.instance_number);
        let tree = &mut self.tree;
        let p = *self
            .patients
            .entry(item.patient_id.clone())
            .or_insert_with(|| {
                tree.patients.push(Group::new(i, (String::new(), 0)));
                tree.patients.len() - 1
            });
        let (p, s) = *self
            .studies
            .entry(item.study_uid.clone())
            .or_insert_with(|| {
                let list = &mut tree.patients[p].members;
                list.push(Group::new(i, (item.study_when.clone(), 0)));
                (p, list.len() - 1)
            });
        let (p, s, e) = *self
            .series
            .entry(item.series_uid.clone())
            .or_insert_with(|| {
                let list = &mut tree.patients[p].members[s].members;
                list.push(Group::new(i, (String::new(), item.series_number)));
                (p, s, list.len() - 1)
            });
        tree.patients[p].members[s].members[e].members.push(i);
    }

    /// The ordered tree.
    pub fn finish(self) -> Tree {
        let mut tree = self.tree;
        for patient in &mut tree.patients {
            patient.members.sort_by(|a, b| a.order.cmp(&b.order));
            for study in &mut patient.members {
                study.members.sort_by(|a, b| a.order.cmp(&b.order));
                for series in &mut study.members {
                    series.members.sort_by_key(|&i| self.numbers[i as usize]);
                }
            }
        }
        tree
    }
}

/// Where an instance is in the tree: (patient, study, series, instance), each 0-based.
pub type Position = [u32; 4];

/// The position of every instance, by instance number.
pub fn positions(tree: &Tree, count: usize) -> Vec<Position> {
    let mut out = vec![[0; 4]; count];
    for (p, patient) in (0u32..).zip(&tree.patients) {
        for (s, study) in (0u32..).zip(&patient.members) {
            for (e, series) in (0u32..).zip(&study.members) {
                for (n, &i) in (0u32..).zip(&series.members) {
                    out[i as usize] = [p, s, e, n];
                }
            }
        }
    }
    out
}

/// The File ID of the instance at `position`:
/// `[DICOM, PA000001, ST000001, SE000001, IM000001]`.
pub fn file_id(position: Position) -> [String; 5] {
    let [p, s, e, n] = position;
    [
        DICOM_FOLDER.to_owned(),
        component("PA", p),
        component("ST", s),
        component("SE", e),
        component("IM", n),
    ]
}

/// The File ID components of the `n`-th (0-based) member of a level with `prefix`.
fn component(prefix: &str, n: u32) -> String {
    format!("{prefix}{:06}", u64::from(n) + 1)
}

/// Whether `id` is a valid File ID: 1-8 components of 1-8 characters of A-Z, 0-9, `_`.
pub fn is_valid_file_id(components: &[&str]) -> bool {
    (1..=8).contains(&components.len())
        && components.iter().all(|c| {
            (1..=8).contains(&c.len())
                && c.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// A safe name for an attachment in [`ATTACHMENT_FOLDER`]: letters, digits, `.`, `-`, `_`
/// kept, anything else `_`, at most 64 characters, never hidden.
pub fn attachment_name(original: &str, taken: &mut Vec<String>) -> String {
    let mut name: String = original
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    name = name.trim_start_matches('.').chars().take(64).collect();
    if name.is_empty() {
        name = "ATTACHMENT".into();
    }
    let mut candidate = name.clone();
    let mut n = 1;
    while taken.iter().any(|t| t.eq_ignore_ascii_case(&candidate)) {
        n += 1;
        candidate = format!("{n}_{name}");
    }
    taken.push(candidate.clone());
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(
        patient: &str,
        study: &str,
        when: &str,
        series: &str,
        number: i64,
        n: i64,
    ) -> Placement {
        Placement {
            patient_id: patient.into(),
            study_uid: study.into(),
            series_uid: series.into(),
            study_when: when.into(),
            series_number: number,
            instance_number: n,
        }
    }

    #[test]
    fn studies_series_and_instances_are_ordered_ties_keep_the_order_of_adding() {
        let mut layout = Layout::default();
        for p in [
            place("P1", "S-late", "20260102", "E2", 2, 1),
            place("P1", "S-early", "20260101", "E9", 1, 5),
            place("P1", "S-late", "20260102", "E1", 1, 3),
            place("P1", "S-late", "20260102", "E1", 1, 1),
            place("P2", "S-other", "20250101", "E3", 1, 1),
            place("P1", "S-late", "20260102", "E1", 1, 1),
        ] {
            layout.add(&p);
        }
        let tree = layout.finish();
        let shape: Vec<Vec<Vec<Vec<u32>>>> = tree
            .patients
            .iter()
            .map(|p| {
                p.members
                    .iter()
                    .map(|s| s.members.iter().map(|e| e.members.clone()).collect())
                    .collect()
            })
            .collect();
        // P1 first (added first); its early study first; in the late study series 1 (E1)
        // before series 2; in E1 instance number 1 (added 4th, then 6th) before 3.
        assert_eq!(
            shape,
            vec![
                vec![vec![vec![1]], vec![vec![3, 5, 2], vec![0]]],
                vec![vec![vec![4]]]
            ]
        );
        let firsts: Vec<u32> = tree.patients[0].members.iter().map(|s| s.first).collect();
        assert_eq!(firsts, [1, 0]);
        let positions = positions(&tree, 6);
        assert_eq!(positions[2], [0, 1, 0, 2]);
        assert_eq!(
            file_id(positions[4]).join("/"),
            "DICOM/PA000002/ST000001/SE000001/IM000001"
        );
    }

    #[test]
    fn file_ids_follow_the_rules() {
        let id = [DICOM_FOLDER, &component("PA", 0), &component("IM", 999_998)];
        assert!(is_valid_file_id(&id));
        assert!(!is_valid_file_id(&["dicom"]));
        assert!(!is_valid_file_id(&["IM0000001"]));
        assert!(!is_valid_file_id(&["A"; 9]));
    }

    #[test]
    fn attachment_names_are_safe_and_unique() {
        let mut taken = Vec::new();
        assert_eq!(attachment_name("紹介状.pdf", &mut taken), "___.pdf");
        assert_eq!(attachment_name("../..pdf", &mut taken), "_..pdf");
        assert_eq!(attachment_name("紹介状.pdf", &mut taken), "2____.pdf");
    }
}
