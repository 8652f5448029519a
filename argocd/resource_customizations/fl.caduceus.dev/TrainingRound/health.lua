-- Argo CD health of a TrainingRound (fl.caduceus.dev/v1alpha1). Rounds are created by the operator
-- and owned by their study, so Argo CD shows them in the study's resource tree.
--
-- Reads the conditions the Caduceus operator writes (operator/src/round.rs):
--   Succeeded               Unknown: Running
--                           True:    Succeeded
--                           False:   QuorumNotReached, AggregatorFailed
--   FairnessWithinThreshold True:    WithinThreshold
--                           False:   DemographicParityExceeded, EqualizedOddsExceeded, ThresholdsExceeded
--                           Unknown: InsufficientData, NoThresholds
--
-- Only the Lua base and table libraries are used: Argo CD runs argocd-cm scripts without the
-- string, math, io and os libraries (resource.customizations.useOpenLibs is not needed).
local hs = {}

local function condition(status, conditionType)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

-- "Reason: message" of a condition.
local function describe(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

-- A message when the status (or the condition) describes an older generation than the spec.
local function staleness(generation, status, c)
  if generation == nil then
    return nil
  end
  local observed = status.observedGeneration
  if observed == nil then
    return "Waiting for the operator to observe generation " .. generation .. " (the status has no observedGeneration)"
  end
  if observed < generation then
    return "Waiting for the operator to observe generation " .. generation .. " (the status describes generation " .. observed .. ")"
  end
  if c ~= nil and c.observedGeneration ~= nil and c.observedGeneration < generation then
    return "Waiting for the operator to observe generation " .. generation .. " (the " .. c.type .. " condition describes generation " .. c.observedGeneration .. ")"
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to start the round's Jobs"
  return hs
end

local succeeded = condition(status, "Succeeded")
local stale = staleness(obj.metadata.generation, status, succeeded)
if stale ~= nil then
  hs.status = "Progressing"
  hs.message = stale
  return hs
end
if succeeded == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to set the Succeeded condition"
  return hs
end

if succeeded.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = describe(succeeded)
  return hs
end

if succeeded.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(succeeded)
  return hs
end

if succeeded.status == "True" then
  local fairness = condition(status, "FairnessWithinThreshold")
  if fairness ~= nil and fairness.status == "False" then
    -- The model was aggregated, but its fairness gaps exceed the study's thresholds.
    hs.status = "Degraded"
    hs.message = describe(fairness) .. " (" .. describe(succeeded) .. ")"
    return hs
  end
  hs.status = "Healthy"
  hs.message = describe(succeeded)
  if fairness ~= nil then
    hs.message = hs.message .. "; " .. describe(fairness)
  end
  return hs
end

hs.status = "Unknown"
hs.message = "Succeeded condition has an unexpected status " .. tostring(succeeded.status) .. ": " .. describe(succeeded)
return hs
