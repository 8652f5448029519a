//! The committed CRD YAML must equal what the Rust types generate (the types are the single source).

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, crd) in caduceus_crds::all_crds() {
        let generated = caduceus_crds::render_yaml(&crd).unwrap();
        let committed = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{file} is missing ({e}); run `make crds`"));
        assert!(
            committed == generated,
            "{file} is out of date with crds/src; run `make crds` and commit it"
        );
    }
}

#[test]
fn crds_have_short_names_category_and_status_subresource() {
    for (file, crd) in caduceus_crds::all_crds() {
        let names = &crd.spec.names;
        assert!(
            names
                .categories
                .as_ref()
                .is_some_and(|c| c.iter().any(|c| c == "caduceus")),
            "{file}"
        );
        assert!(names.short_names.as_ref().is_some_and(|s| s.len() >= 2), "{file}");
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{file}"
        );
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 4),
            "{file}"
        );
        assert_eq!(crd.spec.scope, "Namespaced");
    }
    let round = caduceus_crds::all_crds().remove(2).1;
    let shorts = round.spec.names.short_names.unwrap();
    assert!(shorts.contains(&"round".to_string()) && shorts.contains(&"rounds".to_string()));
}

#[test]
fn cross_field_rules_are_in_the_schema() {
    let yaml = serde_json::to_string(&caduceus_crds::all_crds()[0].1).unwrap();
    for rule in [
        "self.strategy != 'FedProx' || has(self.mu)",
        "self.aggregation.strategy != 'FairFed'",
        "self.secureAggregation.mode == 'Tfhe'",
        "self.minHospitals <= self.maxHospitals",
    ] {
        assert!(yaml.contains(rule), "missing CEL rule {rule}");
    }
    let round = serde_json::to_string(&caduceus_crds::all_crds()[2].1).unwrap();
    assert!(
        round.contains("self == oldSelf"),
        "TrainingRound spec must be immutable"
    );
}
