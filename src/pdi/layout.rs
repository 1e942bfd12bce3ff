//! Where each instance goes in the file set: PATIENT -> STUDY -> SERIES -> instance
//! grouping, ordering, and File IDs (`DICOM/PA000001/ST000001/SE000001/IM000001`: at most
//! 8 components of at most 8 characters from A-Z, 0-9 and `_`, PS3.10 8.2, PS3.12).

use std::collections::HashMap;

/// The top folder of every DICOM file in our sets.
pub const DICOM_FOLDER: &str = "DICOM";
/// The folder of non-DICOM attachments (never inside the DICOM tree).
pub const ATTACHMENT_FOLDER: &str = "ATTACH";

/// Instances grouped: patients -> studies -> series -> instance indices.
#[derive(Debug, Default)]
pub struct Tree {
    /// Patients in order.
    pub patients: Vec<Group<Group<Group<usize>>>>,
}

/// One level of the hierarchy: its key and its members, in order.
#[derive(Debug)]
pub struct Group<T> {
    /// The grouping key (Patient ID, Study or Series Instance UID).
    pub key: String,
    /// The index of the instance the group's record keys are taken from.
    pub first: usize,
    /// Members in order.
    pub members: Vec<T>,
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

/// Groups and orders instances: studies by date, series by number, instances by number
/// (ties keep the input order).
pub fn group(items: &[Placement]) -> Tree {
    let mut tree = Tree::default();
    let mut patients: HashMap<&str, usize> = HashMap::new();
    let mut studies: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut series: HashMap<&str, (usize, usize, usize)> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let p = *patients.entry(&item.patient_id).or_insert_with(|| {
            tree.patients.push(Group {
                key: item.patient_id.clone(),
                first: i,
                members: Vec::new(),
            });
            tree.patients.len() - 1
        });
        let (p, s) = *studies.entry(&item.study_uid).or_insert_with(|| {
            let list = &mut tree.patients[p].members;
            list.push(Group {
                key: item.study_uid.clone(),
                first: i,
                members: Vec::new(),
            });
            (p, list.len() - 1)
        });
        let (p, s, e) = *series.entry(&item.series_uid).or_insert_with(|| {
            let list = &mut tree.patients[p].members[s].members;
            list.push(Group {
                key: item.series_uid.clone(),
                first: i,
                members: Vec::new(),
            });
            (p, s, list.len() - 1)
        });
        tree.patients[p].members[s].members[e].members.push(i);
    }
    for patient in &mut tree.patients {
        patient
            .members
            .sort_by(|a, b| items[a.first].study_when.cmp(&items[b.first].study_when));
        for study in &mut patient.members {
            study.members.sort_by_key(|s| items[s.first].series_number);
            for series in &mut study.members {
                series.members.sort_by_key(|&i| items[i].instance_number);
            }
        }
    }
    tree
}

/// The File ID components of the `n`-th (0-based) member of a level with `prefix`.
pub fn component(prefix: &str, n: usize) -> String {
    format!("{prefix}{:06}", n + 1)
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
