output "release" {
  description = "The operator's Helm release, as <namespace>/<name>."
  value       = "${module.caduceus.release_namespace}/${module.caduceus.release_name}"
}

output "hospital_namespaces" {
  description = "Namespace of each hospital."
  value       = module.caduceus.hospital_namespaces
}

output "hospital_clients" {
  description = "The HospitalClients, as <namespace>/<name>."
  value       = module.caduceus.hospital_clients
}
