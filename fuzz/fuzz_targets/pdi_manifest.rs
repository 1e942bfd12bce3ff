//! The PDI manifest (`CLOUDPDI/MANIFEST.JSON`) as `FileSet::manifest` reads it
//! (serde_json into `pdi::manifest::Manifest`), and the path check every entry goes
//! through before the verifier touches a file (`pdi::zip::check_name`). A manifest that
//! parses must serialize back to one that parses to the same value.
#![no_main]

use cloudpdi::pdi::manifest::Manifest;
use cloudpdi::pdi::zip::check_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    for file in &manifest.files {
        if let Ok(relative) = check_name(&file.path) {
            assert!(relative.is_relative(), "{relative:?} stays inside the set");
            assert!(
                relative
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
                "{relative:?} has only plain components"
            );
        }
    }
    let text = serde_json::to_vec(&manifest).expect("serializes");
    let again: Manifest = serde_json::from_slice(&text).expect("reads back");
    assert_eq!(again, manifest);
});
