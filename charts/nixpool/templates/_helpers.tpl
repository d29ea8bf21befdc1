{{/* The chart's name part: nameOverride, else "nixpool". */}}
{{- define "nixpool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<name> (just <release> when it already contains the name), or fullnameOverride. */}}
{{- define "nixpool.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "nixpool.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nixpool.labels" -}}
{{ include "nixpool.selectorLabels" . }}
app.kubernetes.io/part-of: nixpool
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.global.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Never changes for a release: a Deployment's selector is immutable. */}}
{{- define "nixpool.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-operator" (include "nixpool.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The builder image of pools without spec.image: repository:tag, the tag defaulting to appVersion. */}}
{{- define "nixpool.builderImage" -}}
{{- if kindIs "string" .Values.builderImage -}}
{{- .Values.builderImage -}}
{{- else -}}
{{- printf "%s:%s" .Values.builderImage.repository (.Values.builderImage.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* global.imagePullSecrets then imagePullSecrets, each name once. */}}
{{- define "nixpool.imagePullSecrets" -}}
{{- $names := list -}}
{{- range concat .Values.global.imagePullSecrets .Values.imagePullSecrets -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- range uniq $names }}
- name: {{ . }}
{{- end -}}
{{- end -}}

{{- define "nixpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nixpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions: one rule per thing it does, nothing more. */}}
{{- define "nixpool.rules" -}}
# Watch the pools.
- apiGroups: [nixpool.dev]
  resources: [nixbuilderpools]
  verbs: [get, list, watch]
# Write their status (server-side apply on /status).
- apiGroups: [nixpool.dev]
  resources: [nixbuilderpools/status]
  verbs: [patch]
# The builder and gateway Deployments: watched as owned children, server-side applied (an apply
# that creates the object needs create as well as patch); a gateway a pool drops is deleted.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
# The SSH Service, the agent, authorized-keys and gateway-demand ConfigMaps of each pool, and the
# team-key ConfigMaps pools name (watched by their nixpool.dev/use=true label).
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch, delete]
# A pool's gateway runs as its own ServiceAccount, with a Role that lets it watch the pool's pods
# and write its demand ConfigMap; watched as owned children like the others.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, delete]
# Kubernetes lets the operator grant only rights it holds, hence pods get/list/watch (the
# gateway's Role); patch sets the pod-deletion cost before a scale-down, so idle builders go first.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
# Secrets only by name, never listed or watched: the host key it generates (created once, never
# overwritten), and the Secrets a pool names (its own host key, deprecated team-key Secrets,
# cache tokens), read to check they exist and are opted in.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
# PodDisruptionBudgets of builders and gateways where policy/v1 is served (a dropped gateway's is deleted).
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# Events on pools (HostKeyGenerated, Applied, InvalidSpec, BadAuthorizedKeys, ScaledUp, ScaledDown).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
