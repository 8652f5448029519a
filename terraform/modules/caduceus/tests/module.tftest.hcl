# Offline tests of the module: the providers are mocked (no cluster, no chart needed beyond a Chart.yaml).
# Run with `tofu test` after `tofu init` in terraform/modules/caduceus; terraform/check.sh does both.

mock_provider "helm" {}
mock_provider "kubernetes" {}

variables {
  # Any directory with a Chart.yaml satisfies the module's precondition; the mocked helm provider reads nothing.
  chart_path       = "./charts/hospital-client"
  study_namespaces = ["caduceus-studies"]
  api_server_cidrs = ["10.0.0.10/32"]
  hospitals = {
    st-mary = {
      data              = { claim_name = "faces", path = "/utkface/shard-0" }
      privacy_budget    = { epsilon = 8 }
      consented_studies = ["caduceus-studies/gender-fedavg"]
      trainer = {
        node_selector = { "caduceus.dev/pool" = "training" }
        tolerations   = [{ key = "dedicated", operator = "Equal", value = "training", effect = "NoSchedule" }]
      }
    }
    general = {
      namespace      = "hospital-general-2"
      data           = { claim_name = "faces", format = "UtkfaceFilenames" }
      privacy_budget = { epsilon = 0.5, delta = 1e-6 }
    }
  }
}

run "valid_inputs_apply" {
  command = apply

  assert {
    condition     = output.hospital_namespaces == { general = "hospital-general-2", st-mary = "hospital-st-mary" }
    error_message = "hospital namespaces: ${jsonencode(output.hospital_namespaces)}"
  }
  assert {
    condition     = output.hospital_clients == { general = "hospital-general-2/general", st-mary = "hospital-st-mary/st-mary" }
    error_message = "hospital clients: ${jsonencode(output.hospital_clients)}"
  }
  assert {
    condition     = output.release_name == "caduceus" && output.release_namespace == "caduceus-system"
    error_message = "release: ${output.release_namespace}/${output.release_name}"
  }
  assert {
    condition     = length(kubernetes_namespace.hospital) == 2 && length(kubernetes_namespace.study) == 1 && length(kubernetes_namespace.operator) == 1
    error_message = "expected 1 operator, 1 study and 2 hospital namespaces"
  }
  # The chart's Roles, CADUCEUS_WATCH_NAMESPACES, NetworkPolicies and admission policies follow these.
  assert {
    condition = yamldecode(output.values).namespaces == {
      studies   = ["caduceus-studies"]
      hospitals = ["hospital-general-2", "hospital-st-mary"]
    }
    error_message = "namespaces values: ${output.values}"
  }
  assert {
    condition     = yamldecode(output.values).networkPolicy == { apiServer = { cidrs = ["10.0.0.10/32"] } }
    error_message = "networkPolicy values: ${output.values}"
  }
  # Unset variables leave the chart's defaults: no key with a null value reaches Helm.
  assert {
    condition     = !strcontains(output.values, "null") && !contains(keys(yamldecode(output.values)), "image")
    error_message = "values contain nulls or unset keys: ${output.values}"
  }
  assert {
    condition = yamldecode(helm_release.hospital["st-mary"].values[0]).spec == {
      data             = { claimName = "faces", path = "/utkface/shard-0", format = "Manifest" }
      privacyBudget    = { epsilon = 8, delta = 0.00001 }
      consentedStudies = ["caduceus-studies/gender-fedavg"]
      trainer = {
        nodeSelector = { "caduceus.dev/pool" = "training" }
        tolerations  = [{ key = "dedicated", operator = "Equal", value = "training", effect = "NoSchedule" }]
      }
    }
    error_message = "st-mary spec: ${helm_release.hospital["st-mary"].values[0]}"
  }
  assert {
    condition     = !contains(keys(yamldecode(helm_release.hospital["general"].values[0]).spec), "trainer")
    error_message = "a hospital without trainer hints must not get spec.trainer"
  }
}

run "chart_values_when_set" {
  command = plan

  variables {
    crds                     = { create = false, keep = true }
    image                    = { repository = "ghcr.io/caduceus/operator", tag = "0.3.0", pull_policy = "IfNotPresent" }
    workload_images          = { trainer = { tag = "0.3.0" } }
    replica_count            = 2
    leader_election_enabled  = true
    endpoint_mode            = "loopback"
    monitoring               = { service_monitor = true, prometheus_rule = false }
    network_policy_enabled   = true
    api_server_cidrs         = ["172.18.0.2/32", "fd00::2/128"]
    admission_policy_enabled = false
    resources                = { requests = { cpu = "100m", memory = "128Mi" } }
  }

  assert {
    condition = yamldecode(output.values) == {
      crds           = { create = false, keep = true }
      image          = { repository = "ghcr.io/caduceus/operator", tag = "0.3.0", pullPolicy = "IfNotPresent" }
      replicaCount   = 2
      leaderElection = { enabled = true }
      workloads      = { trainer = { image = { tag = "0.3.0" } }, endpointMode = "loopback" }
      metrics        = { serviceMonitor = { enabled = true } }
      prometheusRule = { enabled = false }
      namespaces = {
        studies   = ["caduceus-studies"]
        hospitals = ["hospital-general-2", "hospital-st-mary"]
      }
      networkPolicy   = { enabled = true, apiServer = { cidrs = ["172.18.0.2/32", "fd00::2/128"] } }
      admissionPolicy = { enabled = false }
      resources       = { requests = { cpu = "100m", memory = "128Mi" } }
    }
    error_message = "values: ${output.values}"
  }
}

run "rejects_zero_epsilon" {
  command = plan
  variables {
    hospitals = {
      st-mary = {
        data           = { claim_name = "faces" }
        privacy_budget = { epsilon = 0 }
      }
    }
  }
  expect_failures = [var.hospitals]
}

run "rejects_delta_of_one" {
  command = plan
  variables {
    hospitals = {
      st-mary = {
        data           = { claim_name = "faces" }
        privacy_budget = { epsilon = 1, delta = 1 }
      }
    }
  }
  expect_failures = [var.hospitals]
}

run "rejects_invalid_hospital_namespace" {
  command = plan
  variables {
    hospitals = {
      st-mary = {
        namespace      = "Hospital_St_Mary"
        data           = { claim_name = "faces" }
        privacy_budget = { epsilon = 1 }
      }
    }
  }
  expect_failures = [var.hospitals]
}

run "rejects_dotdot_in_data_path" {
  command = plan
  variables {
    hospitals = {
      st-mary = {
        data           = { claim_name = "faces", path = "/data/../etc" }
        privacy_budget = { epsilon = 1 }
      }
    }
  }
  expect_failures = [var.hospitals]
}

run "trainer_images_and_non_private_consent_reach_the_spec" {
  command = plan
  variables {
    hospitals = {
      st-mary = {
        data                      = { claim_name = "faces" }
        privacy_budget            = { epsilon = 1 }
        allowed_trainer_images    = ["registry.example/caduceus/", "sha256:${join("", [for i in range(64) : "a"])}"]
        allow_non_private_studies = true
      }
    }
  }
  assert {
    condition = yamldecode(helm_release.hospital["st-mary"].values[0]).spec.allowedTrainerImages == [
      "registry.example/caduceus/", "sha256:${join("", [for i in range(64) : "a"])}"
    ]
    error_message = "allowedTrainerImages: ${helm_release.hospital["st-mary"].values[0]}"
  }
  assert {
    condition     = yamldecode(helm_release.hospital["st-mary"].values[0]).spec.allowNonPrivateStudies == true
    error_message = "allowNonPrivateStudies: ${helm_release.hospital["st-mary"].values[0]}"
  }
}

run "rejects_a_trainer_image_given_by_tag" {
  command = plan
  variables {
    hospitals = {
      st-mary = {
        data                   = { claim_name = "faces" }
        privacy_budget         = { epsilon = 1 }
        allowed_trainer_images = ["registry.example/caduceus/trainer:latest"]
      }
    }
  }
  expect_failures = [var.hospitals]
}

run "rejects_study_without_namespace" {
  command = plan
  variables {
    hospitals = {
      st-mary = {
        data              = { claim_name = "faces" }
        privacy_budget    = { epsilon = 1 }
        consented_studies = ["gender-fedavg"]
      }
    }
  }
  expect_failures = [var.hospitals]
}

run "rejects_invalid_operator_namespace" {
  command = plan
  variables {
    namespace = "-caduceus"
  }
  expect_failures = [var.namespace]
}

run "rejects_empty_image_tag" {
  command = plan
  variables {
    image = { tag = "" }
  }
  expect_failures = [var.image]
}

run "rejects_unknown_endpoint_mode" {
  command = plan
  variables {
    endpoint_mode = "nodeport"
  }
  expect_failures = [var.endpoint_mode]
}

run "network_policies_off_need_no_cidrs" {
  command = plan
  variables {
    network_policy_enabled = false
    api_server_cidrs       = []
  }
  assert {
    condition     = yamldecode(output.values).networkPolicy == { enabled = false }
    error_message = "networkPolicy values: ${output.values}"
  }
}

run "rejects_network_policies_without_api_server_cidrs" {
  command = plan
  variables {
    api_server_cidrs = []
  }
  expect_failures = [helm_release.caduceus]
}

run "rejects_api_server_address_without_prefix" {
  command = plan
  variables {
    api_server_cidrs = ["10.0.0.10"]
  }
  expect_failures = [var.api_server_cidrs]
}

run "rejects_no_study_namespace" {
  command = plan
  variables {
    study_namespaces = []
  }
  expect_failures = [helm_release.caduceus]
}

run "rejects_missing_chart" {
  command = plan
  variables {
    chart_path = "./no-such-chart"
  }
  expect_failures = [helm_release.caduceus]
}

# ---------------------------------------------------------------- roles (docs/sites.md)

run "role_all_passes_no_sites_values" {
  command = plan
  assert {
    condition     = length(setintersection(keys(yamldecode(output.values)), ["role", "gateway", "site"])) == 0 && !contains(keys(yamldecode(output.values).namespaces), "sites")
    error_message = "role all must leave the chart's sites-mode values alone: ${output.values}"
  }
  assert {
    condition     = length(kubernetes_namespace.sites) == 0 && output.role == "all" && output.sites_namespace == null && output.site_hospital == null
    error_message = "role all creates no sites namespace"
  }
}

run "coordinator_values" {
  command = apply
  variables {
    role             = "coordinator"
    hospitals        = {}
    study_namespaces = ["caduceus-studies"]
    gateway = {
      address                     = "fl.example.org:7443"
      server_names                = ["fl.example.org", "203.0.113.10"]
      service_type                = "LoadBalancer"
      load_balancer_source_ranges = ["198.51.100.0/24"]
    }
  }
  assert {
    condition = yamldecode(output.values).role == "coordinator" && yamldecode(output.values).gateway == {
      address     = "fl.example.org:7443"
      serverNames = ["fl.example.org", "203.0.113.10"]
      service     = { type = "LoadBalancer", loadBalancerSourceRanges = ["198.51.100.0/24"] }
    }
    error_message = "coordinator values: ${output.values}"
  }
  assert {
    condition     = yamldecode(output.values).namespaces == { studies = ["caduceus-studies"], hospitals = [], sites = "caduceus-sites" }
    error_message = "coordinator namespaces: ${output.values}"
  }
  assert {
    condition     = length(kubernetes_namespace.sites) == 1 && length(kubernetes_namespace.hospital) == 0 && length(helm_release.hospital) == 0
    error_message = "a coordinator gets the sites namespace and no hospital"
  }
  assert {
    condition     = !contains(keys(yamldecode(output.values)), "site") && output.sites_namespace == "caduceus-sites"
    error_message = "coordinator: no site values; sites namespace output"
  }
}

run "site_values" {
  command = apply
  variables {
    role              = "site"
    study_namespaces  = []
    coordinator_cidrs = ["203.0.113.10/32"]
    site_join_secret  = "caduceus-join"
    hospitals = {
      st-mary = {
        data              = { claim_name = "faces" }
        privacy_budget    = { epsilon = 8 }
        consented_studies = ["caduceus-studies/gender-fedavg@${join("", [for i in range(64) : "b"])}"]
      }
    }
  }
  assert {
    condition     = yamldecode(output.values).role == "site" && yamldecode(output.values).site == { hospital = "hospital-st-mary/st-mary", joinSecret = "caduceus-join" }
    error_message = "site values: ${output.values}"
  }
  # The chart serves the namespace of site.hospital; both lists stay empty.
  assert {
    condition     = yamldecode(output.values).namespaces == { studies = [], hospitals = [] }
    error_message = "site namespaces: ${output.values}"
  }
  assert {
    condition     = yamldecode(output.values).networkPolicy == { apiServer = { cidrs = ["10.0.0.10/32"] }, coordinator = { cidrs = ["203.0.113.10/32"] } }
    error_message = "site networkPolicy: ${output.values}"
  }
  assert {
    condition     = !contains(keys(yamldecode(output.values)), "gateway") && length(kubernetes_namespace.study) == 0 && length(kubernetes_namespace.sites) == 0
    error_message = "a site has no gateway, no study namespace, no sites namespace"
  }
  assert {
    condition     = output.site_hospital == "hospital-st-mary/st-mary" && output.hospital_clients == { st-mary = "hospital-st-mary/st-mary" }
    error_message = "the site's HospitalClient: ${jsonencode(output.hospital_clients)}"
  }
}

run "rejects_unknown_role" {
  command = plan
  variables {
    role = "hub"
  }
  expect_failures = [var.role]
}

run "rejects_coordinator_without_gateway_address" {
  command = plan
  variables {
    role      = "coordinator"
    hospitals = {}
  }
  expect_failures = [helm_release.caduceus]
}

run "rejects_coordinator_with_hospitals" {
  command = plan
  variables {
    role    = "coordinator"
    gateway = { address = "fl.example.org:7443" }
  }
  expect_failures = [helm_release.caduceus]
}

run "rejects_site_with_two_hospitals" {
  command = plan
  variables {
    role              = "site"
    study_namespaces  = []
    coordinator_cidrs = ["203.0.113.10/32"]
  }
  expect_failures = [helm_release.caduceus]
}

run "rejects_site_without_coordinator_cidrs" {
  command = plan
  variables {
    role             = "site"
    study_namespaces = []
    hospitals = {
      st-mary = {
        data           = { claim_name = "faces" }
        privacy_budget = { epsilon = 8 }
      }
    }
  }
  expect_failures = [helm_release.caduceus]
}

run "rejects_gateway_address_without_port" {
  command = plan
  variables {
    role      = "coordinator"
    hospitals = {}
    gateway   = { address = "fl.example.org", service_type = "NodePort" }
  }
  expect_failures = [var.gateway]
}

run "rejects_unknown_gateway_service_type" {
  command = plan
  variables {
    role      = "coordinator"
    hospitals = {}
    gateway   = { address = "fl.example.org:7443", service_type = "Ingress" }
  }
  expect_failures = [var.gateway]
}
