-- Neuronpedia database schema (subset) for tests: PostgreSQL 15 DDL.
--
-- What: the DDL that `prisma migrate` (Prisma 5.22, i.e.
--   `prisma migrate diff --from-empty --to-schema-datamodel`) would generate
--   for 11 models of Neuronpedia's Prisma schema, on an empty database:
--   User, Model, SourceRelease, SourceSet, Source, Neuron, Activation,
--   Explanation, ExplanationType, ExplanationModelType, ExplanationModelSettings,
--   plus the one enum they use ("Visibility").
-- Source: https://github.com/hijohnnylin/neuronpedia
--   file apps/webapp/prisma/schema.prisma
--   at commit ebb8426fc550ad5d1f76d52c271a624af3c08a57
--   Naming, types, defaults and FK actions follow that repository's squashed
--   migration (apps/webapp/prisma/migrations/000000000000_squashed_migrations)
--   and later migrations; where the current schema.prisma differs, the
--   current schema.prisma wins. Columns are in schema field order, as a fresh
--   migration would emit them (the live database, built by ALTER TABLE ADD
--   COLUMN migrations, has some columns in a different physical order).
--
-- Left out, and why:
--   * CREATE EXTENSION "vector" (pgvector): not available here.
--     "Explanation"."embedding" is Unsupported("vector(256)") in Prisma and
--     `vector(256)` in the real database; here it is declared REAL[] instead.
--     Nothing the tests load writes it. The two Prisma-declared indexes on it
--     ("Explanation_embedding_idx", "idx_explanation_embedding_null") are kept
--     as the plain indexes Prisma emits for them (btree on REAL[]).
--   * All other models/enums of the schema (Account, Session, UserSecret,
--     List*, Comment, Bookmark, Vote, Eval*, ExplanationScore*,
--     ExplanationActivationV1, SavedSearch*, SteerOutput*, Inference/Graph
--     host tables, GraphMetadata*, Jlens*, Problem*, Nla*, Sample*, Probe*,
--     ModelHead*, ProcessLock, ...) and their foreign keys: not needed by the
--     tests. Those tables reference the tables below, never the reverse.
--   * Foreign keys from the tables below to tables not in this file: none
--     exist (every relation with `fields:` on these 11 models points to
--     another of these 11 models), so no FK was dropped for that reason.
--   * @default(cuid()) / @default(uuid()) and @updatedAt are client-side in
--     Prisma: no database default (e.g. "User"."id",
--     "User"."emailUnsubscribeCode"). @updatedAt columns that also carry
--     @default(now()) do get DEFAULT CURRENT_TIMESTAMP.

-- CreateEnum
CREATE TYPE "Visibility" AS ENUM ('PUBLIC', 'UNLISTED', 'PRIVATE');

-- CreateTable
CREATE TABLE "User" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "bio" TEXT DEFAULT '',
    "email" TEXT,
    "emailVerified" TIMESTAMP(3),
    "githubUsername" TEXT,
    "bot" BOOLEAN NOT NULL DEFAULT false,
    "image" TEXT,
    "admin" BOOLEAN NOT NULL DEFAULT false,
    "canTriggerExplanations" BOOLEAN NOT NULL DEFAULT false,
    "isProblemEditor" BOOLEAN NOT NULL DEFAULT false,
    "emailNewsletterNotification" BOOLEAN NOT NULL DEFAULT true,
    "emailUnsubscribeAll" BOOLEAN NOT NULL DEFAULT false,
    "emailUnsubscribeCode" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "User_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Model" (
    "id" TEXT NOT NULL,
    "displayNameShort" TEXT NOT NULL DEFAULT '',
    "displayName" TEXT NOT NULL DEFAULT '',
    "creatorId" TEXT NOT NULL,
    "tlensId" TEXT,
    "openRouterId" TEXT,
    "dimension" INTEGER,
    "thinking" BOOLEAN NOT NULL DEFAULT false,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "defaultSourceSetName" TEXT,
    "defaultSourceId" TEXT,
    "defaultGraphSourceSetName" TEXT,
    "inferenceEnabled" BOOLEAN NOT NULL DEFAULT false,
    "instruct" BOOLEAN NOT NULL DEFAULT false,
    "layers" INTEGER NOT NULL,
    "neuronsPerLayer" INTEGER NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "owner" TEXT NOT NULL,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "website" TEXT,

    CONSTRAINT "Model_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "Source" (
    "id" TEXT NOT NULL,
    "modelId" TEXT NOT NULL,
    "hasDashboards" BOOLEAN NOT NULL DEFAULT true,
    "inferenceEnabled" BOOLEAN NOT NULL DEFAULT false,
    "saelensConfig" JSONB,
    "saelensRelease" TEXT,
    "saelensSaeId" TEXT,
    "hfRepoId" TEXT,
    "hfFolderId" TEXT,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "defaultOfModelId" TEXT,
    "setName" TEXT NOT NULL,
    "creatorId" TEXT NOT NULL,
    "hasUmap" BOOLEAN NOT NULL DEFAULT false,
    "hasUmapLogSparsity" BOOLEAN NOT NULL DEFAULT false,
    "hasUmapClusters" BOOLEAN NOT NULL DEFAULT false,
    "num_prompts" INTEGER,
    "num_tokens_in_prompt" INTEGER,
    "dataset" TEXT,
    "notes" TEXT,
    "cosSimMatchModelId" TEXT,
    "cosSimMatchSourceId" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- CreateTable
CREATE TABLE "SourceSet" (
    "modelId" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "hasDashboards" BOOLEAN NOT NULL DEFAULT true,
    "allowInferenceSearch" BOOLEAN NOT NULL DEFAULT true,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "description" TEXT NOT NULL,
    "type" TEXT NOT NULL DEFAULT '',
    "creatorName" TEXT NOT NULL,
    "urls" TEXT[],
    "creatorEmail" TEXT,
    "creatorId" TEXT NOT NULL,
    "releaseName" TEXT,
    "hasGraphs" BOOLEAN NOT NULL DEFAULT false,
    "graphEnabled" BOOLEAN NOT NULL DEFAULT false,
    "similarityMatrixEnabled" BOOLEAN NOT NULL DEFAULT false,
    "defaultOfModelId" TEXT,
    "defaultGraphModelId" TEXT,
    "defaultRange" INTEGER NOT NULL DEFAULT 1,
    "defaultShowBreaks" BOOLEAN NOT NULL DEFAULT true,
    "showDfa" BOOLEAN NOT NULL DEFAULT false,
    "showCorrelated" BOOLEAN NOT NULL DEFAULT false,
    "showHeadAttribution" BOOLEAN NOT NULL DEFAULT false,
    "showUmap" BOOLEAN NOT NULL DEFAULT false,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- CreateTable
CREATE TABLE "SourceRelease" (
    "name" TEXT NOT NULL,
    "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "isNewUi" BOOLEAN NOT NULL DEFAULT false,
    "featured" BOOLEAN NOT NULL DEFAULT false,
    "description" TEXT NOT NULL,
    "descriptionShort" TEXT,
    "urls" TEXT[],
    "creatorEmail" TEXT,
    "creatorName" TEXT NOT NULL,
    "creatorNameShort" TEXT,
    "creatorId" TEXT NOT NULL,
    "defaultSourceSetName" TEXT,
    "defaultSourceId" TEXT,
    "defaultUmapSourceIds" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- CreateTable
CREATE TABLE "Neuron" (
    "modelId" TEXT NOT NULL,
    "layer" TEXT NOT NULL,
    "index" TEXT NOT NULL,
    "sourceSetName" TEXT,
    "creatorId" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "maxActApprox" DOUBLE PRECISION DEFAULT 0,
    "hasVector" BOOLEAN NOT NULL DEFAULT false,
    "vector" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "vectorLabel" TEXT,
    "vectorDefaultSteerStrength" DOUBLE PRECISION DEFAULT 10,
    "hookName" TEXT,
    "topkCosSimIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "topkCosSimValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "neuron_alignment_indices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "neuron_alignment_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "neuron_alignment_l1" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_neurons_indices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "correlated_neurons_pearson" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_neurons_l1" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_features_indices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "correlated_features_pearson" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "correlated_features_l1" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "neg_str" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "neg_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "pos_str" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "pos_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "frac_nonzero" DOUBLE PRECISION NOT NULL DEFAULT 0,
    "freq_hist_data_bar_heights" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "freq_hist_data_bar_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "logits_hist_data_bar_heights" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "logits_hist_data_bar_values" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "decoder_weights_dist" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "umap_cluster" INTEGER,
    "umap_log_feature_sparsity" DOUBLE PRECISION,
    "umap_x" DOUBLE PRECISION,
    "umap_y" DOUBLE PRECISION
);

-- CreateTable
CREATE TABLE "Explanation" (
    "id" TEXT NOT NULL,
    "modelId" TEXT NOT NULL,
    "layer" TEXT NOT NULL,
    "index" TEXT NOT NULL,
    -- Real schema: Unsupported("vector(256)"), i.e. pgvector `vector(256)`.
    -- pgvector is not available here, so REAL[] stands in; tests never write it.
    "embedding" REAL[],
    "description" TEXT NOT NULL,
    "authorId" TEXT NOT NULL,
    "triggeredByUserId" TEXT,
    "notes" TEXT,
    "scoreV1" DOUBLE PRECISION NOT NULL DEFAULT 0,
    "scoreV2" DOUBLE PRECISION,
    "umap_x" DOUBLE PRECISION DEFAULT 0,
    "umap_y" DOUBLE PRECISION DEFAULT 0,
    "umap_cluster" INTEGER DEFAULT 0,
    "umap_log_feature_sparsity" DOUBLE PRECISION DEFAULT 0,
    "typeName" TEXT,
    "explanationModelName" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "Explanation_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "ExplanationModelSettings" (
    "id" TEXT NOT NULL,
    "temperature" DOUBLE PRECISION,
    "maxTokens" INTEGER,
    "topP" DOUBLE PRECISION,
    "frequencyPenalty" DOUBLE PRECISION,

    CONSTRAINT "ExplanationModelSettings_pkey" PRIMARY KEY ("id")
);

-- CreateTable
CREATE TABLE "ExplanationModelType" (
    "name" TEXT NOT NULL,
    "displayName" TEXT NOT NULL,
    "description" TEXT NOT NULL,
    "featured" BOOLEAN NOT NULL DEFAULT true,
    "openRouterModelId" TEXT,
    "url" TEXT,
    "creatorName" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "ExplanationModelType_pkey" PRIMARY KEY ("name")
);

-- CreateTable
CREATE TABLE "ExplanationType" (
    "name" TEXT NOT NULL,
    "displayName" TEXT NOT NULL,
    "description" TEXT NOT NULL,
    "featured" BOOLEAN NOT NULL DEFAULT true,
    "isAttention" BOOLEAN NOT NULL DEFAULT false,
    "explainerModelSettingsId" TEXT,
    "settings" TEXT,
    "url" TEXT,
    "creatorName" TEXT NOT NULL,
    "creatorId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,

    CONSTRAINT "ExplanationType_pkey" PRIMARY KEY ("name")
);

-- CreateTable
CREATE TABLE "Activation" (
    "id" TEXT NOT NULL,
    "tokens" TEXT[],
    "dataIndex" TEXT,
    "index" TEXT NOT NULL,
    "layer" TEXT NOT NULL,
    "modelId" TEXT NOT NULL,
    "dataSource" TEXT,
    "maxValue" DOUBLE PRECISION NOT NULL,
    "maxValueTokenIndex" INTEGER NOT NULL,
    "minValue" DOUBLE PRECISION NOT NULL,
    "values" DOUBLE PRECISION[],
    "dfaValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "dfaTargetIndex" INTEGER,
    "dfaMaxValue" DOUBLE PRECISION,
    "zQIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "zKIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "zValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "creatorId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "lossValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "logitContributions" TEXT,
    "binMin" DOUBLE PRECISION,
    "binMax" DOUBLE PRECISION,
    "binContains" DOUBLE PRECISION,
    "qualifyingTokenIndex" INTEGER,

    CONSTRAINT "Activation_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE UNIQUE INDEX "User_name_key" ON "User"("name");

-- CreateIndex
CREATE UNIQUE INDEX "User_email_key" ON "User"("email");

-- CreateIndex
CREATE INDEX "User_bot_idx" ON "User"("bot");

-- CreateIndex
CREATE UNIQUE INDEX "User_emailUnsubscribeCode_key" ON "User"("emailUnsubscribeCode");

-- CreateIndex
CREATE INDEX "Model_visibility_idx" ON "Model"("visibility");

-- CreateIndex
CREATE INDEX "Model_creatorId_idx" ON "Model"("creatorId");

-- CreateIndex
CREATE UNIQUE INDEX "Model_defaultSourceSetName_id_key" ON "Model"("defaultSourceSetName", "id");

-- CreateIndex
CREATE UNIQUE INDEX "Model_defaultSourceId_id_key" ON "Model"("defaultSourceId", "id");

-- CreateIndex
CREATE UNIQUE INDEX "Model_defaultGraphSourceSetName_id_key" ON "Model"("defaultGraphSourceSetName", "id");

-- CreateIndex
CREATE INDEX "Source_setName_idx" ON "Source"("setName");

-- CreateIndex
CREATE INDEX "Source_modelId_setName_idx" ON "Source"("modelId", "setName");

-- CreateIndex
CREATE INDEX "Source_creatorId_idx" ON "Source"("creatorId");

-- CreateIndex
CREATE INDEX "Source_visibility_idx" ON "Source"("visibility");

-- CreateIndex
CREATE UNIQUE INDEX "Source_modelId_id_key" ON "Source"("modelId", "id");

-- CreateIndex
CREATE INDEX "SourceSet_visibility_idx" ON "SourceSet"("visibility");

-- CreateIndex
CREATE INDEX "SourceSet_name_idx" ON "SourceSet"("name");

-- CreateIndex
CREATE INDEX "SourceSet_releaseName_idx" ON "SourceSet"("releaseName");

-- CreateIndex
CREATE INDEX "SourceSet_creatorId_idx" ON "SourceSet"("creatorId");

-- CreateIndex
CREATE UNIQUE INDEX "SourceSet_modelId_name_key" ON "SourceSet"("modelId", "name");

-- CreateIndex
CREATE UNIQUE INDEX "SourceRelease_name_key" ON "SourceRelease"("name");

-- CreateIndex
CREATE INDEX "SourceRelease_creatorId_idx" ON "SourceRelease"("creatorId");

-- CreateIndex
CREATE INDEX "SourceRelease_visibility_idx" ON "SourceRelease"("visibility");

-- CreateIndex
CREATE INDEX "SourceRelease_featured_idx" ON "SourceRelease"("featured");

-- CreateIndex
CREATE INDEX "Neuron_modelId_idx" ON "Neuron"("modelId");

-- CreateIndex
CREATE INDEX "Neuron_modelId_layer_idx" ON "Neuron"("modelId", "layer");

-- CreateIndex
CREATE INDEX "Neuron_maxActApprox_idx" ON "Neuron"("maxActApprox");

-- CreateIndex
CREATE INDEX "Neuron_creatorId_idx" ON "Neuron"("creatorId");

-- CreateIndex
CREATE INDEX "Neuron_creatorId_hasVector_idx" ON "Neuron"("creatorId", "hasVector");

-- CreateIndex
CREATE INDEX "Neuron_modelId_creatorId_hasVector_idx" ON "Neuron"("modelId", "creatorId", "hasVector");

-- CreateIndex
CREATE INDEX "Neuron_hasVector_idx" ON "Neuron"("hasVector");

-- CreateIndex
CREATE INDEX "Neuron_modelId_hasVector_idx" ON "Neuron"("modelId", "hasVector");

-- CreateIndex
CREATE UNIQUE INDEX "Neuron_modelId_layer_index_key" ON "Neuron"("modelId", "layer", "index");

-- CreateIndex
CREATE INDEX "Explanation_modelId_layer_index_idx" ON "Explanation"("modelId", "layer", "index");

-- CreateIndex
CREATE INDEX "Explanation_modelId_layer_idx" ON "Explanation"("modelId", "layer");

-- CreateIndex
CREATE INDEX "Explanation_modelId_idx" ON "Explanation"("modelId");

-- CreateIndex
CREATE INDEX "Explanation_authorId_idx" ON "Explanation"("authorId");

-- CreateIndex
CREATE INDEX "Explanation_triggeredByUserId_idx" ON "Explanation"("triggeredByUserId");

-- CreateIndex
CREATE INDEX "Explanation_typeName_idx" ON "Explanation"("typeName");

-- CreateIndex
CREATE INDEX "Explanation_createdAt_idx" ON "Explanation"("createdAt");

-- CreateIndex
CREATE INDEX "Explanation_explanationModelName_idx" ON "Explanation"("explanationModelName");

-- CreateIndex
CREATE INDEX "Explanation_typeName_explanationModelName_idx" ON "Explanation"("typeName", "explanationModelName");

-- CreateIndex (on the REAL[] stand-in for vector(256); see note at top)
CREATE INDEX "Explanation_embedding_idx" ON "Explanation"("embedding");

-- CreateIndex (on the REAL[] stand-in for vector(256); see note at top)
CREATE INDEX "idx_explanation_embedding_null" ON "Explanation"("embedding");

-- CreateIndex
CREATE INDEX "ExplanationType_creatorId_idx" ON "ExplanationType"("creatorId");

-- CreateIndex
CREATE INDEX "activation_model_layer_index" ON "Activation"("modelId", "layer", "index");

-- AddForeignKey
ALTER TABLE "Model" ADD CONSTRAINT "Model_defaultSourceSetName_id_fkey" FOREIGN KEY ("defaultSourceSetName", "id") REFERENCES "SourceSet"("name", "modelId") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Model" ADD CONSTRAINT "Model_defaultSourceId_id_fkey" FOREIGN KEY ("defaultSourceId", "id") REFERENCES "Source"("id", "modelId") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Model" ADD CONSTRAINT "Model_defaultGraphSourceSetName_id_fkey" FOREIGN KEY ("defaultGraphSourceSetName", "id") REFERENCES "SourceSet"("name", "modelId") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Model" ADD CONSTRAINT "Model_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Source" ADD CONSTRAINT "Source_modelId_setName_fkey" FOREIGN KEY ("modelId", "setName") REFERENCES "SourceSet"("modelId", "name") ON DELETE RESTRICT ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Source" ADD CONSTRAINT "Source_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Source" ADD CONSTRAINT "Source_cosSimMatchSourceId_cosSimMatchModelId_fkey" FOREIGN KEY ("cosSimMatchSourceId", "cosSimMatchModelId") REFERENCES "Source"("id", "modelId") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "SourceSet" ADD CONSTRAINT "SourceSet_modelId_fkey" FOREIGN KEY ("modelId") REFERENCES "Model"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "SourceSet" ADD CONSTRAINT "SourceSet_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "SourceSet" ADD CONSTRAINT "SourceSet_releaseName_fkey" FOREIGN KEY ("releaseName") REFERENCES "SourceRelease"("name") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "SourceRelease" ADD CONSTRAINT "SourceRelease_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_modelId_layer_fkey" FOREIGN KEY ("modelId", "layer") REFERENCES "Source"("modelId", "id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_modelId_sourceSetName_fkey" FOREIGN KEY ("modelId", "sourceSetName") REFERENCES "SourceSet"("modelId", "name") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_modelId_fkey" FOREIGN KEY ("modelId") REFERENCES "Model"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Explanation" ADD CONSTRAINT "Explanation_authorId_fkey" FOREIGN KEY ("authorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Explanation" ADD CONSTRAINT "Explanation_triggeredByUserId_fkey" FOREIGN KEY ("triggeredByUserId") REFERENCES "User"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Explanation" ADD CONSTRAINT "Explanation_modelId_fkey" FOREIGN KEY ("modelId") REFERENCES "Model"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Explanation" ADD CONSTRAINT "Explanation_modelId_layer_index_fkey" FOREIGN KEY ("modelId", "layer", "index") REFERENCES "Neuron"("modelId", "layer", "index") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Explanation" ADD CONSTRAINT "Explanation_typeName_fkey" FOREIGN KEY ("typeName") REFERENCES "ExplanationType"("name") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Explanation" ADD CONSTRAINT "Explanation_explanationModelName_fkey" FOREIGN KEY ("explanationModelName") REFERENCES "ExplanationModelType"("name") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "ExplanationType" ADD CONSTRAINT "ExplanationType_explainerModelSettingsId_fkey" FOREIGN KEY ("explainerModelSettingsId") REFERENCES "ExplanationModelSettings"("id") ON DELETE SET NULL ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "ExplanationType" ADD CONSTRAINT "ExplanationType_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Activation" ADD CONSTRAINT "Activation_modelId_layer_index_fkey" FOREIGN KEY ("modelId", "layer", "index") REFERENCES "Neuron"("modelId", "layer", "index") ON DELETE CASCADE ON UPDATE CASCADE;

-- AddForeignKey
ALTER TABLE "Activation" ADD CONSTRAINT "Activation_creatorId_fkey" FOREIGN KEY ("creatorId") REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE;
